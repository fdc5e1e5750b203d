"""`memwise bench serve`'s numbers: percentiles, throughput, goodput and the outcome counts of one
load run, as results.json, results.md and a plot of the latency distributions."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memwise.bench.report import write_atomic

PERCENTILES = (50, 90, 99)
STATES = ("completed", "cancelled", "rejected", "failed")


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 (linear interpolation between order statistics), mean; None when empty."""
    if not values:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None}
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        rank = (len(ordered) - 1) * p / 100
        low = int(rank)
        high = min(low + 1, len(ordered) - 1)
        out[f"p{p}"] = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    out["mean"] = sum(ordered) / len(ordered)
    return out


def summarize(requests: list[dict[str, Any]], duration_s: float, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> dict[str, Any]:
    """The run's summary from its per-request records (serve_load.results_as_dicts)."""
    done = [r for r in requests if r["state"] == "completed"]
    counts = {state: sum(r["state"] == state for r in requests) for state in STATES}
    out_tokens = sum(r["output_tokens"] for r in done)

    def good(r: dict[str, Any]) -> bool:
        if slo_ttft_ms is not None and (r["ttft_s"] is None or r["ttft_s"] * 1e3 > slo_ttft_ms):
            return False
        return slo_tpot_ms is None or r["tpot_s"] is None or r["tpot_s"] * 1e3 <= slo_tpot_ms
    good_count = sum(good(r) for r in done)
    return {
        "requests": len(requests), **counts,
        "accounted": sum(counts.values()) == len(requests),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s if duration_s > 0 else None,
        "output_tokens": out_tokens,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else None,
        "decode_throughput": decode_throughput(done),
        "goodput": good_count / duration_s if duration_s > 0 else None,
        "good_requests": good_count,
        "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms,
        "by_replica": _by_replica(requests),
        "ttft_s": percentiles([r["ttft_s"] for r in done if r["ttft_s"] is not None]),
        "tpot_s": percentiles([r["tpot_s"] for r in done if r["tpot_s"] is not None]),
        "itl_s": percentiles([gap for r in done for gap in r["itl_s"]]),
        "e2e_s": percentiles([r["e2e_s"] for r in done if r["e2e_s"] is not None]),
    }


def decode_throughput(done: list[dict[str, Any]]) -> float | None:
    """Tokens after the first, over the time in which at least one request was past its first token
    (the union of [first token, last token] across requests). Prefills of newcomers that stall the
    running batch fall inside that time: they count as the scheduler's cost. None without such tokens."""
    spans = sorted((r["start_s"] + r["ttft_s"], r["start_s"] + r["e2e_s"]) for r in done
                   if r["ttft_s"] is not None and r["e2e_s"] is not None and r["output_tokens"] >= 2)
    tokens = sum(r["output_tokens"] - 1 for r in done
                 if r["ttft_s"] is not None and r["e2e_s"] is not None and r["output_tokens"] >= 2)
    covered, end = 0.0, float("-inf")
    for a, b in spans:
        covered += max(0.0, b - max(a, end))
        end = max(end, b)
    return tokens / covered if covered > 0 else None


def _by_replica(requests: list[dict[str, Any]]) -> dict[str, int]:
    """Requests answered per replica (X-Memwise-Replica); empty for a server that does not say."""
    counts: dict[str, int] = {}
    for r in requests:
        if r.get("replica"):
            counts[r["replica"]] = counts.get(r["replica"], 0) + 1
    return counts


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1e3:,.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _slo_text(summary: dict[str, Any]) -> str:
    parts = [f"{name} <= {summary[key]:g} ms" for key, name in (("slo_ttft_ms", "TTFT"), ("slo_tpot_ms", "TPOT"))
             if summary[key] is not None]
    return "SLO " + ", ".join(parts) if parts else "no SLO given: every completed request counts"


def markdown(metadata: dict[str, Any], summary: dict[str, Any]) -> str:
    s = summary
    lines = [f"# memwise bench serve: {metadata.get('model')}", "",
             f"`{metadata.get('command')}`", "",
             f"- target: {metadata.get('target')}; {s['requests']} requests, max_tokens {metadata.get('max_tokens')}, "
             f"rate {metadata.get('request_rate')}/s, max concurrency {metadata.get('max_concurrency') or 'unlimited'}, "
             f"disconnect fraction {metadata.get('disconnect_fraction')}",
             f"- outcomes: {s['completed']} completed, {s['cancelled']} cancelled, {s['rejected']} rejected (429), "
             f"{s['failed']} failed; every request accounted: {'yes' if s['accounted'] else 'NO'}",
             f"- duration {s['duration_s']:.2f} s; request throughput {_num(s['request_throughput'])} req/s; "
             f"output token throughput {_num(s['output_throughput'], 1)} tok/s; decode throughput "
             f"{_num(s['decode_throughput'], 1)} tok/s",
             f"- goodput {_num(s['goodput'])} req/s ({s['good_requests']} completed requests within "
             f"{_slo_text(s)})"]
    if s.get("by_replica"):
        lines.append("- answered by replica: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["by_replica"].items())))
    ref = metadata.get("offline_reference")
    if ref:
        offline = ref.get("decode_tok_s")
        ratio = s["decode_throughput"] / offline if offline and s["decode_throughput"] else None
        lines.append(f"- offline reference: memwise bench {ref.get('model')} batch {ref.get('batch_size')}, "
                     f"{ref.get('prompt_tokens')}+{ref.get('new_tokens')} tokens, {ref.get('runs')} runs: decode "
                     f"{_num(offline, 1)} tok/s (runs {_num(ref.get('decode_tok_s_min'), 1)} to "
                     f"{_num(ref.get('decode_tok_s_max'), 1)}); served decode / offline decode = {_num(ratio)}"
                     + (f" ({ref['reason']})" if ref.get("reason") else ""))
        whole = ref.get("output_tok_s")
        if whole and s["output_throughput"]:
            lines.append(f"- offline output (prefill of the batch included: batch x new tokens / end-to-end) "
                         f"{_num(whole, 1)} tok/s; served output / offline output = "
                         f"{_num(s['output_throughput'] / whole)}")
    server = metadata.get("server") or {}
    if server:
        lines.append(f"- server: peak RSS {_num((server.get('peak_rss_bytes') or 0) / 2**20, 0)} MiB "
                     f"(idle before {_num((server.get('rss_before_bytes') or 0) / 2**20, 0)} MiB, after "
                     f"{_num((server.get('rss_after_bytes') or 0) / 2**20, 0)} MiB); exit code {server.get('exit_code')}")
    health = metadata.get("health_polls") or {}
    lines.append(f"- /health during the load: {health.get('ok', 0)} answered, {health.get('bad', 0)} not")
    leak = metadata.get("leak_check") or {}
    verdict = {True: "no leaks", False: "LEAK", None: "not checked"}[leak.get("ok")]
    lines.append(f"- after the load: {verdict}; server state {json.dumps(leak.get('state'))}"
                 + (f" ({leak['reason']})" if leak.get("reason") and leak.get("ok") is not None else ""))
    lines += ["", "| metric (ms) | p50 | p90 | p99 | mean |", "|---|---:|---:|---:|---:|"]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "inter-token"), ("e2e_s", "end-to-end")):
        v = s[key]
        lines.append(f"| {label} | {_ms(v['p50'])} | {_ms(v['p90'])} | {_ms(v['p99'])} | {_ms(v['mean'])} |")
    return "\n".join(lines) + "\n"


def cdf_plot(requests: list[dict[str, Any]]) -> bytes | None:
    """PNG of the empirical CDFs of TTFT, TPOT, inter-token and end-to-end latency; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    done = [r for r in requests if r["state"] == "completed"]
    series = {"TTFT": [r["ttft_s"] for r in done if r["ttft_s"] is not None],
              "TPOT": [r["tpot_s"] for r in done if r["tpot_s"] is not None],
              "inter-token": [g for r in done for g in r["itl_s"]],
              "end-to-end": [r["e2e_s"] for r in done if r["e2e_s"] is not None]}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (name, values) in zip(axes, series.items()):
        ordered = sorted(v * 1e3 for v in values)
        if ordered:
            ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post")
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(directory: Path, metadata: dict[str, Any], summary: dict[str, Any],
                  requests: list[dict[str, Any]]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    payload = {"metadata": metadata, "summary": summary, "requests": requests}
    for name, data in (("results.json", json.dumps(payload, indent=2, default=str) + "\n"),
                       ("results.md", markdown(metadata, summary)), ("latency_cdf.png", cdf_plot(requests))):
        if data is not None:
            write_atomic(directory / name, data)
            written.append(directory / name)
    return written


def comparison_markdown(metadata: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    """One table of every engine's run (same prompts, rate and concurrency), skipped ones with why."""
    lines = [f"# memwise bench serve: {metadata.get('model')}, {len(runs)} engines", "", f"`{metadata.get('command')}`",
             "", f"- {metadata.get('num_requests')} requests each, max_tokens {metadata.get('max_tokens')}, rate "
             f"{metadata.get('request_rate')}/s, max concurrency {metadata.get('max_concurrency') or 'unlimited'}; "
             "the engines ran one after another, each in a fresh server process", "",
             "| engine | completed | prompt tokens (mean) | output tokens | output tok/s | decode tok/s | req/s | "
             "TTFT p50 / p99 ms | TPOT p50 ms | inter-token p50 / p99 ms | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for engine, run in runs.items():
        if "skipped" in run:
            skipped.append(f"- {engine}: skipped: {run['skipped']}")
            continue
        s, server = run["summary"], run["metadata"].get("server") or {}
        prompt = [r["prompt_tokens"] for r in run["requests"] if r.get("prompt_tokens")]
        lines.append(f"| {engine} | {s['completed']}/{s['requests']} | "
                     f"{_num(sum(prompt) / len(prompt), 1) if prompt else 'n/a'} | {s['output_tokens']} | "
                     f"{_num(s['output_throughput'], 1)} | {_num(s['decode_throughput'], 1)} | "
                     f"{_num(s['request_throughput'])} | {_ms(s['ttft_s']['p50'])} / {_ms(s['ttft_s']['p99'])} | "
                     f"{_ms(s['tpot_s']['p50'])} | {_ms(s['itl_s']['p50'])} / {_ms(s['itl_s']['p99'])} | "
                     f"{_num((server.get('peak_rss_bytes') or 0) / 2**20, 0)} |")
    lines += ["", *skipped] if skipped else []
    for engine, run in runs.items():
        if "skipped" not in run:
            lines.append(f"- {engine}: {run['metadata'].get('weights')}; `{run['metadata'].get('target')}`")
    return "\n".join(lines) + "\n"


def comparison_plot(runs: dict[str, dict[str, Any]]) -> bytes | None:
    """PNG: output token throughput and TTFT p50 / p99 per engine; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    ran = {e: r["summary"] for e, r in runs.items() if "skipped" not in r}
    if not ran:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(ran)
    left.bar(names, [s["output_throughput"] or 0 for s in ran.values()])
    left.set_ylabel("output tokens / s")
    left.set_title("throughput (higher is better)")
    width = 0.38
    xs = range(len(names))
    right.bar([x - width / 2 for x in xs], [(s["ttft_s"]["p50"] or 0) * 1e3 for s in ran.values()], width, label="p50")
    right.bar([x + width / 2 for x in xs], [(s["ttft_s"]["p99"] or 0) * 1e3 for s in ran.values()], width, label="p99")
    right.set_xticks(list(xs), names)
    right.set_ylabel("ms")
    right.set_title("time to first token (lower is better)")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
