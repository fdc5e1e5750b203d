"""Served decode throughput against the offline batch decode, as the prompts grow: `memwise bench serve
MODEL --prompt-tokens N --offline-reference` for each N, several times, and a plot of the two ratios.

    PYTHONPATH=src python benchmarks/serve_prompt_sweep.py --out DIR \
        [--model preset:mmfree-370m] [--prompt-tokens 8 16 32 64 128] [--repeats 3] \
        [--num-requests 64] [--max-concurrency 16] [--max-tokens 128]

Why a sweep: a served stream's newcomers are prefilled while the others decode, so the served decode
rate pays for every prompt token and the offline one (decode steps only) for none; on a CPU a prompt
token costs about what a batch-16 decode row does, so the ratio is set mostly by the prompt length
against the output length. The served output throughput against the offline run *with* its prefill
(the same work on both sides) is the scheduler's own cost. Each N runs --repeats times, the lengths
in turn (8, 16, ..., 8, 16, ...), so that a slow spell of the machine does not fall on one length.

Writes DIR/N-rR/ (each run's files), DIR/sweep.json, DIR/sweep.md and DIR/sweep.png (matplotlib;
--replot redraws it from sweep.json).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_once(args: argparse.Namespace, tokens: int, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "memwise.cli", "bench", "serve", args.model, "--prompt-tokens", str(tokens),
               "--num-requests", str(args.num_requests), "--max-concurrency", str(args.max_concurrency),
               "--max-tokens", str(args.max_tokens), "--max-batch", str(args.max_concurrency),
               "--offline-reference", "--out", str(out)]
    started = time.strftime("%H:%M:%S", time.gmtime())
    code = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
    if not (out / "results.json").exists():
        raise SystemExit(f"serve_prompt_sweep: {shlex.join(command)} exited {code} and wrote no results.json")
    results = json.loads((out / "results.json").read_text())
    summary, offline = results["summary"], results["metadata"]["offline_reference"]
    return {"prompt_tokens": tokens, "started_utc": started, "exit_code": code,
            "command": shlex.join(["memwise", *command[3:]]),
            "served_decode_tok_s": summary["decode_throughput"], "served_output_tok_s": summary["output_throughput"],
            "offline_decode_tok_s": offline["decode_tok_s"], "offline_output_tok_s": offline["output_tok_s"],
            "offline_prefill_tok_s": offline["prefill_tok_s"],
            "decode_ratio": summary["decode_throughput"] / offline["decode_tok_s"],
            "output_ratio": summary["output_throughput"] / offline["output_tok_s"],
            "ttft_p99_s": summary["ttft_s"]["p99"], "completed": summary["completed"]}


def ceiling(tokens: int, new_tokens: int, prefill_tok_s: float, decode_tok_s: float) -> float:
    """Served over offline decode if prompt tokens cost what the offline batch prefill does, and
    nothing else is lost: new_tokens of decode against those plus the prompt's share of the time."""
    return new_tokens / (new_tokens + tokens * decode_tok_s / prefill_tok_s)


def table(runs: list[dict[str, Any]], new_tokens: int) -> tuple[str, list[dict[str, Any]]]:
    rows, lines = [], ["| prompt tokens | runs | served / offline decode: median (range) | served / offline "
                       "output, prefill included | ceiling from the offline prefill and decode rates | "
                       "TTFT p99 s (median) |", "|---:|---:|---|---|---:|---:|"]
    for tokens in sorted({r["prompt_tokens"] for r in runs}):
        mine = [r for r in runs if r["prompt_tokens"] == tokens]
        decode, output = [r["decode_ratio"] for r in mine], [r["output_ratio"] for r in mine]
        bound = statistics.median(ceiling(tokens, new_tokens, r["offline_prefill_tok_s"], r["offline_decode_tok_s"])
                                  for r in mine)
        row = {"prompt_tokens": tokens, "decode_ratio_median": statistics.median(decode),
               "decode_ratio_min": min(decode), "decode_ratio_max": max(decode),
               "output_ratio_median": statistics.median(output), "ceiling": bound,
               "ttft_p99_s": statistics.median(r["ttft_p99_s"] for r in mine)}
        rows.append(row)
        lines.append(f"| {tokens} | {len(mine)} | {row['decode_ratio_median']:.2f} ({min(decode):.2f}-{max(decode):.2f}) "
                     f"| {row['output_ratio_median']:.2f} ({min(output):.2f}-{max(output):.2f}) | {bound:.2f} "
                     f"| {row['ttft_p99_s']:.2f} |")
    return "\n".join(lines) + "\n", rows


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], title: str, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter([r["prompt_tokens"] for r in runs], [r["decode_ratio"] for r in runs], s=14, color="C0", alpha=0.5)
    ax.plot([r["prompt_tokens"] for r in rows], [r["decode_ratio_median"] for r in rows], "o-", color="C0",
            label="served / offline decode (median, and each run)")
    ax.plot([r["prompt_tokens"] for r in rows], [r["output_ratio_median"] for r in rows], "s--", color="C1",
            label="served / offline output, prefill included (median)")
    ax.plot([r["prompt_tokens"] for r in rows], [r["ceiling"] for r in rows], ":", color="grey",
            label="ceiling: prompt tokens at the offline prefill rate")
    ax.axhline(0.8, color="C3", lw=0.8, label="0.8")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens per request")
    ax.set_ylabel("ratio")
    ax.set_ylim(0, 1.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="preset:mmfree-370m")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--replot", action="store_true", help="redraw DIR/sweep.png from DIR/sweep.json")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((args.out / "sweep.json").read_text())
        plot(saved["runs"], saved["rows"], saved["title"], args.out / "sweep.png")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(1, args.repeats + 1):
        for tokens in args.prompt_tokens:
            run = run_once(args, tokens, args.out / f"{tokens}-r{repeat}")
            runs.append(run)
            print(f"{run['started_utc']} prompt {tokens} run {repeat}: decode ratio {run['decode_ratio']:.2f}, "
                  f"output ratio {run['output_ratio']:.2f}", flush=True)
    text, rows = table(runs, args.max_tokens)
    title = (f"{args.model}: {args.num_requests} requests, {args.max_concurrency} streams, "
             f"{args.max_tokens} new tokens\nmemwise bench serve --prompt-tokens N --offline-reference")
    (args.out / "sweep.json").write_text(json.dumps({"title": title, "runs": runs, "rows": rows}, indent=1) + "\n")
    (args.out / "sweep.md").write_text(f"# {title.replace(chr(10), '; ')}\n\n{text}")
    plot(runs, rows, title, args.out / "sweep.png")
    print(text)


if __name__ == "__main__":
    main()
