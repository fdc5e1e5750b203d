"""`memwise bench serve`: flags, and one load run from start to files.

Either starts `memwise serve MODEL` in a fresh process (and samples its memory) or aims at --url.
After the load: the leak check, then (with --offline-reference) the same model's offline decode
throughput at the same batch, measured by `memwise bench`'s own cell in a fresh process once the
server has stopped, so the two never share the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memwise.errors import MemwiseError


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second or inf, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a rate > 0 (or inf), got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected milliseconds > 0, got {text!r}")
    return value


def add_serve_parser(nested: Any, positive: Any) -> argparse.ArgumentParser:
    """`bench serve` under `memwise bench`; `positive` is bench's positive-integer argparse type."""
    p = nested.add_parser("serve", help="load-test an OpenAI-compatible server (TTFT, TPOT, throughput, leaks)",
                          description="Send streaming completions to `memwise serve MODEL` (started here on a free "
                                      "127.0.0.1 port) or to --url, and report TTFT, TPOT, inter-token and "
                                      "end-to-end latency percentiles, throughput, goodput, outcomes and leaks.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="what to serve (any `memwise serve` SOURCE); "
                   "with --url, the model name the requests carry")
    p.add_argument("--url", help="aim at this running server (base URL, without /v1) instead of starting one")
    p.add_argument("--engine", action="append", choices=("memwise", "transformers", "llama.cpp"),
                   help="start this engine's server (repeat for several, one after another, same load): "
                        "memwise (default), transformers (one request at a time), llama.cpp (llama_cpp.server "
                        "on memwise's GGUF export)")
    p.add_argument("--num-requests", type=positive, default=100, metavar="N")
    p.add_argument("--request-rate", type=_rate, default=math.inf, metavar="R",
                   help="mean requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=positive, metavar="C", help="at most C requests in flight")
    p.add_argument("--max-tokens", type=positive, default=64, metavar="N", help="tokens per request (default 64)")
    p.add_argument("--prompts-file", type=Path, metavar="JSONL", help="prompts, one JSON string or "
                   "{\"prompt\": ...} a line (default: built-in deterministic prompts)")
    p.add_argument("--prompt-tokens", type=positive, metavar="N",
                   help="prompts of the built-in words cut to N tokens of MODEL's tokenizer (like vllm bench "
                        "serve's --random-input-len); instead of the built-in 4 to 20 words")
    p.add_argument("--disconnect-fraction", type=_fraction, default=0.0, metavar="F",
                   help="this fraction of clients close their stream midway")
    p.add_argument("--slo-ttft-ms", type=_positive_ms, metavar="MS", help="goodput counts requests with TTFT <= MS")
    p.add_argument("--slo-tpot-ms", type=_positive_ms, metavar="MS", help="... and TPOT <= MS")
    p.add_argument("--seed", type=int, default=0, help="arrivals, prompts and who disconnects")
    p.add_argument("--api-key", help="send Authorization: Bearer KEY")
    p.add_argument("--max-batch", type=positive, default=16, help="started server: sequences decoded together")
    p.add_argument("--max-queue", type=positive, default=64, help="started server: requests that may wait")
    p.add_argument("--max-step-tokens", type=_tokens, metavar="N",
                   help="started server: tokens per engine step (memwise serve's default 128; 0: whole prompts)")
    p.add_argument("--threads", type=positive, help="started server (and offline reference): CPU threads")
    p.add_argument("--quantize", choices=("int8", "int4", "nf4"), help="started server: weight scheme")
    p.add_argument("--device", default="cpu", help="started server: cpu (default), cuda or cuda:N")
    p.add_argument("--offline-reference", action="store_true",
                   help="also measure the model's offline decode throughput at batch --max-batch (memwise bench)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write results.json, results.md and latency_cdf.png here")
    p.set_defaults(func=serve_command)
    return p


def _tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a token count >= 0, got {text!r}")
    return value


def _server_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--device", args.device]
    if args.max_step_tokens is not None:
        flags += ["--max-step-tokens", str(args.max_step_tokens)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.quantize:
        flags += ["--quantize", args.quantize]
    if args.api_key:
        flags += ["--api-key", args.api_key]
    return flags


def _check(args: argparse.Namespace) -> None:
    if args.model is None:
        raise MemwiseError("bench serve: give MODEL (what to serve, or with --url the model name to request)")
    if args.url is not None and args.engine:
        raise MemwiseError("bench serve: --engine starts servers here; it cannot be combined with --url")
    if args.url is not None and args.offline_reference:
        raise MemwiseError("bench serve: --offline-reference measures memwise's own model; it needs MODEL, not --url")
    if args.prompt_tokens is not None and args.prompts_file is not None:
        raise MemwiseError("bench serve: give --prompts-file or --prompt-tokens, not both")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise MemwiseError(f"bench serve: --out {args.out}: is a file; give a directory (created if missing)")


def _prompts(args: argparse.Namespace) -> list[str]:
    from memwise.bench.serve_load import builtin_prompts, prompts_of_tokens, read_prompts

    if args.prompts_file is not None:
        return read_prompts(args.prompts_file)
    if args.prompt_tokens is None:
        return builtin_prompts(64, args.seed)
    from memwise.language_model import load_tokenizer_of
    try:
        tokenizer = load_tokenizer_of(args.model)
    except MemwiseError as e:
        raise MemwiseError(f"bench serve: --prompt-tokens counts with MODEL's tokenizer: {e}") from None
    return prompts_of_tokens(64, args.prompt_tokens, tokenizer.encode, args.seed)


def serve_command(args: argparse.Namespace) -> int:
    from memwise.bench.serve_load import LoadConfig

    _check(args)
    engines = list(dict.fromkeys(args.engine or ["memwise"]))
    prompts = _prompts(args)
    config = LoadConfig(url=(args.url or "").rstrip("/"), model=args.model, num_requests=args.num_requests,
                        request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                        max_tokens=args.max_tokens, disconnect_fraction=args.disconnect_fraction,
                        seed=args.seed, api_key=args.api_key)
    argv = getattr(args, "bench_argv", None) or sys.argv[sys.argv.index("bench") + 1:]
    metadata: dict[str, Any] = {
        "command": shlex.join(["memwise", "bench", *argv]), "model": args.model,
        "target": args.url or "memwise serve (started here)", "max_tokens": args.max_tokens,
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "disconnect_fraction": args.disconnect_fraction, "num_requests": args.num_requests}
    if args.url is not None:
        requests, duration, metadata["health_polls"] = _against_url(config, prompts, metadata)
        return _finish(args, metadata, requests, duration)
    runs = {engine: _run_engine(args, engine, dataclasses.replace(config), prompts, dict(metadata))
            for engine in engines}
    if args.offline_reference and "memwise" in runs and "skipped" not in runs["memwise"]:
        memwise_run = runs["memwise"]
        memwise_run["metadata"]["offline_reference"] = offline_reference(
            args.model, args.max_batch, memwise_run["requests"], args.max_tokens, args.threads, args.device,
            args.quantize)
    if engines == ["memwise"]:
        run = runs["memwise"]
        return _finish(args, run["metadata"], run["requests"], run["duration"])
    return _finish_engines(args, metadata, runs)


def _run_engine(args: argparse.Namespace, engine: str, config: Any, prompts: list[str],
                metadata: dict[str, Any]) -> dict[str, Any]:
    """One engine's server started, loaded and stopped; {"skipped": why} when it cannot run here."""
    from memwise.bench.serve_launch import free_port
    from memwise.bench.serve_peers import SkipEngine, peer_server

    port = free_port()
    try:
        peer = peer_server(engine, args.model, port, args.model, args.threads)
    except SkipEngine as e:
        print(f"bench serve: {engine}: skipped: {e}", file=sys.stderr)
        return {"skipped": str(e)}
    config.health_path, config.extra_body = peer.health_path, peer.extra_body
    metadata.update(engine=engine, weights=peer.weights,
                    target="memwise serve (started here)" if peer.command is None else shlex.join(peer.command))
    requests, duration, metadata["health_polls"] = _against_started(args, config, prompts, metadata, peer, port)
    return {"metadata": metadata, "requests": requests, "duration": duration}


def _against_started(args: argparse.Namespace, config: Any, prompts: list[str], metadata: dict[str, Any],
                     peer: Any, port: int) -> tuple[list[dict[str, Any]], float, dict[str, int]]:
    from memwise.bench.serve_launch import LaunchedServer, RssSampler
    from memwise.bench.serve_load import leak_check, results_as_dicts, run_load

    label = "memwise serve" if peer.command is None else f"{peer.engine} server"
    with LaunchedServer(args.model, args.model, _server_flags(args), port=port, command=peer.command,
                        health_path=peer.health_path, label=label) as server:
        config.url = server.url
        assert server.proc is not None
        with RssSampler(server.proc.pid) as rss:
            before = rss.read()
            results, duration, health = run_load(config, prompts)
            metadata["leak_check"] = leak_check(server.url, args.api_key)
            after = rss.read()
        requests = results_as_dicts(results)
        if peer.tokenize_path:
            from memwise.bench.serve_peers import count_prompt_tokens
            count_prompt_tokens(server.url, peer.tokenize_path, prompts, requests)
        exit_code = server.stop()
        metadata["server"] = {"pid": server.proc.pid, "rss_before_bytes": before, "peak_rss_bytes": rss.peak,
                              "rss_after_bytes": after, "exit_code": exit_code, "url": server.url}
    return requests, duration, health


def _against_url(config: Any, prompts: list[str],
                 metadata: dict[str, Any]) -> tuple[list[dict[str, Any]], float, dict[str, int]]:
    from memwise.bench.serve_load import leak_check, results_as_dicts, run_load, server_state

    if server_state(config.url, config.api_key) is None:
        raise MemwiseError(f"bench serve: --url {config.url}: /health does not answer 200 with JSON")
    results, duration, health = run_load(config, prompts)
    metadata["leak_check"] = leak_check(config.url, config.api_key)
    return results_as_dicts(results), duration, health


# The offline cell runs at least this many times, and as often as the load's completed requests fill
# its batch, so that it decodes about as many tokens as the load did; its rates are totals over the
# runs (tokens / seconds), as the served ones are. A 2-core VM's speed can move by half from one
# second to the next (docs/serving.md): one short run lands in one phase, a load spans several.
OFFLINE_RUNS = 3


def _total_rate(samples: list[float | None] | None) -> float | None:
    """Runs of equal work at these rates: the work over the summed times (a harmonic mean)."""
    values = [v for v in samples or [] if v]
    return len(values) / sum(1 / v for v in values) if values else None


def offline_reference(model: str, batch: int, requests: list[dict[str, Any]], new_tokens: int,
                      threads: int | None, device: str, quantize: str | None) -> dict[str, Any]:
    """memwise bench's decode throughput of `model` at `batch`, prompt length the served mean."""
    from memwise.bench.cell import CellSpec
    from memwise.bench.runner import resolve_sources, run_cell_process

    lengths = [r["prompt_tokens"] for r in requests if r.get("prompt_tokens")]
    prompt = max(1, round(sum(lengths) / len(lengths))) if lengths else 64
    completed = sum(1 for r in requests if r.get("state") == "completed")
    runs = max(OFFLINE_RUNS, math.ceil(completed / batch))
    source = resolve_sources([model])[model]
    spec = CellSpec(model=source.name, source=asdict(source), engine="memwise", quantize=quantize, device=device,
                    batch_size=batch, prompt_tokens=prompt, new_tokens=new_tokens, runs=runs, warmup=1,
                    threads=threads)
    record = run_cell_process(spec)
    decode = [v for v in record.get("decode_tok_s_samples") or [] if v]
    e2e = [v for v in record.get("e2e_s_samples") or [] if v]
    return {"model": model, "batch_size": batch, "prompt_tokens": prompt, "new_tokens": new_tokens, "runs": runs,
            "decode_tok_s": _total_rate(decode), "prefill_tok_s": _total_rate(record.get("prefill_tok_s_samples")),
            "decode_tok_s_min": min(decode, default=None), "decode_tok_s_max": max(decode, default=None),
            "ttft_s": record.get("ttft_s"), "e2e_s": sum(e2e) / len(e2e) if e2e else None,
            # prefill included: what a server that batched perfectly could give, beside output throughput
            "output_tok_s": batch * new_tokens * len(e2e) / sum(e2e) if e2e else None,
            "status": record.get("status"), "reason": record.get("reason")}


def _finish(args: argparse.Namespace, metadata: dict[str, Any], requests: list[dict[str, Any]],
            duration: float) -> int:
    from memwise.bench.serve_report import markdown, summarize, write_outputs

    summary = summarize(requests, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    print(markdown(metadata, summary))
    if args.out is not None:
        written = write_outputs(args.out, metadata, summary, requests)
        print(f"wrote {', '.join(p.name for p in written)} to {args.out}", file=sys.stderr)
    healthy = metadata["health_polls"].get("bad", 0) == 0
    leak_ok = (metadata.get("leak_check") or {}).get("ok") is not False
    return 0 if summary["accounted"] and summary["failed"] == 0 and healthy and leak_ok else 1


def _finish_engines(args: argparse.Namespace, metadata: dict[str, Any], runs: dict[str, dict[str, Any]]) -> int:
    """Each engine's report (in --out/ENGINE/), then one table and plot of all of them."""
    from memwise.bench.report import write_atomic
    from memwise.bench.serve_report import comparison_markdown, comparison_plot, summarize, write_outputs

    ok = True
    for engine, run in runs.items():
        if "skipped" in run:
            continue
        run["summary"] = summarize(run["requests"], run["duration"], args.slo_ttft_ms, args.slo_tpot_ms)
        if args.out is not None:
            write_outputs(args.out / engine.replace(".", ""), run["metadata"], run["summary"], run["requests"])
        healthy = run["metadata"]["health_polls"].get("bad", 0) == 0
        ok &= run["summary"]["accounted"] and run["summary"]["failed"] == 0 and healthy
    table = comparison_markdown(metadata, runs)
    print(table)
    if args.out is not None:
        write_atomic(args.out / "engines.md", table)
        plot = comparison_plot(runs)
        if plot is not None:
            write_atomic(args.out / "engines.png", plot)
        print(f"wrote engines.md, engines.png and one folder per engine to {args.out}", file=sys.stderr)
    return 0 if ok else 1
