"""The serving engine under `memwise bench serve`'s load, without HTTP: where the served gap goes.

    PYTHONPATH=src python benchmarks/serve_profile.py [--model preset:mmfree-370m] [--num-requests 64]
        [--max-concurrency 16] [--max-tokens 128] [--max-step-tokens 128] [--offline-reference]
        [--prompt-tokens N] [--same-process-offline] [--served] [--compare-prefill] [--rounds N]
    PYTHONPATH=src python benchmarks/serve_profile.py --chunks-ab

Against another tree (e.g. main, before a change): PYTHONPATH=/path/to/that/tree/src, same script.

Drives serve.engine.Engine exactly as `memwise serve` does (the same running batch, step budget and
Sequence objects, the built-in prompts of `bench serve` for the same --seed), but the clients are
plain callbacks in this process: a client sends its next request the moment its last one ends, as
`bench serve --max-concurrency C` does, and a token's time is when the engine emits it. The decode
throughput is serve_report's own (tokens after the first over the union of first-to-last-token
spans); with --offline-reference the same fresh-process `memwise bench` cell that `bench serve
--offline-reference` runs gives the offline batch decode rate. Served (HTTP) over engine-only is the
server's share of the gap; engine-only over offline is the scheduler's. --same-process-offline runs
the offline batch in this process right after each engine round (the same weights in the same pages,
seconds apart), which a machine whose speed moves from process to process needs (docs/serving.md).

The engine's step is timed by phase (decode forwards, prefill forwards, everything else in a step,
waiting for work), with the decode batch sizes it ran and the prompt chunks by length; the engine
thread's CPU time in the decode and prefill forwards is reported beside the wall time (with
--threads 1 and MEMWISE_FIXED_THREADS=1 that is all of their work, and what a shared machine's
other jobs move least).
"""
from __future__ import annotations

import argparse
import functools
import json
import threading
import time
from collections import Counter
from typing import Any

import memwise
from memwise.bench.serve_bench import offline_reference
from memwise.bench.serve_load import builtin_prompts, prompts_of_tokens
from memwise.language_model import load_tokenizer_of
from memwise.bench.serve_report import decode_throughput, percentiles
from memwise.serve.engine import Engine
from memwise.serve.metrics import ServeMetrics
from memwise.serve.protocol import Sampling
from memwise.serve.sequence import Event, Sequence
from memwise.tokenizer import decode_stream


class PhaseClock:
    """Wall time of the batch's decode and prefill forwards, and the decode batch sizes."""

    def __init__(self, batch: Any):
        self.seconds: Counter[str] = Counter()
        # CPU time of the engine thread: with --threads 1 all of the work, and little moved by other
        # jobs on a shared machine (wall time is mostly their time there).
        self.cpu_seconds: Counter[str] = Counter()
        self.decode_sizes: Counter[int] = Counter()
        self.prefill_calls = 0
        self.chunk_sizes: Counter[str] = Counter()    # prompt chunks by length bucket
        # A tree from before the batched prefill has only the one-chunk `_prefill`: timed the same.
        self.prefill = "_prefill_chunks" if hasattr(batch, "_prefill_chunks") else "_prefill"
        for name in ("_decode", self.prefill, "step"):
            original = getattr(batch, name)
            setattr(batch, name, self._timed(name, original))

    def _timed(self, name: str, original: Any) -> Any:
        def run(*args: Any) -> Any:
            if name == "_decode":
                self.decode_sizes[len(args[0])] += 1
            elif name == "_prefill_chunks":
                self.prefill_calls += len(args[0])
                for _, ids in args[0]:
                    self.chunk_sizes[_bucket(len(ids))] += 1
            elif name == "_prefill":
                self.prefill_calls += 1
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.cpu_seconds[name] += time.thread_time() - cpu
        return run


def _bucket(n: int) -> str:
    return "<16" if n < 16 else "<32" if n < 32 else "<64" if n < 64 else ">=64"


class Clients:
    """C closed-loop clients: each sends its next request when its last one ends."""

    def __init__(self, engine: Engine, prompts: list[list[int]], args: argparse.Namespace, tokenizer: Any,
                 eos: tuple[int, ...]):
        self.engine, self.prompts, self.args, self.tokenizer, self.eos = engine, prompts, args, tokenizer, eos
        self.results: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        self.sent = 0
        self.start = 0.0

    def run(self) -> float:
        self.start = time.perf_counter()
        for _ in range(min(self.args.max_concurrency, self.args.num_requests)):
            self._send()
        self.all_done.wait()
        return max(r["start_s"] + r["e2e_s"] for r in self.results)

    def _send(self) -> None:
        with self.lock:
            if self.sent >= self.args.num_requests:
                return
            index = self.sent
            self.sent += 1
        ids = self.prompts[index % len(self.prompts)]
        record = {"index": index, "start_s": time.perf_counter() - self.start, "ttft_s": None, "e2e_s": None,
                  "output_tokens": 0, "prompt_tokens": len(ids), "itl_s": [], "state": "failed"}
        last = [None]

        def emit(event: Event) -> None:    # the engine thread, as the server's callback
            now = time.perf_counter() - self.start
            if event.finish_reason is None or event.completion_tokens:
                if record["ttft_s"] is None:
                    record["ttft_s"] = now - record["start_s"]
                elif last[0] is not None:
                    record["itl_s"].append(now - last[0])
                last[0] = now
            if event.finish_reason is not None:
                record.update(e2e_s=now - record["start_s"], output_tokens=event.completion_tokens,
                              state="completed" if event.finish_reason in ("stop", "length") else "failed")
                with self.lock:
                    self.results.append(record)
                    finished = len(self.results) == self.args.num_requests
                if finished:
                    self.all_done.set()
                else:
                    self._send()

        sampling = Sampling(max_tokens=self.args.max_tokens, temperature=0.0)
        self.engine.submit(Sequence(ids, sampling, emit, decode_stream(self.tokenizer), ()))


def prompt_texts(args: argparse.Namespace) -> list[str]:
    """bench serve's prompts for the same --seed and --prompt-tokens."""
    if args.prompt_tokens is None:
        return builtin_prompts(64, args.seed)
    return prompts_of_tokens(64, args.prompt_tokens, load_tokenizer_of(args.model).encode, args.seed)


def engine_run(model: Any, args: argparse.Namespace, prefill_alone: bool = False) -> dict[str, Any]:
    """The load on an Engine in this process (no HTTP): throughput, latencies, time by phase.
    `prefill_alone`: one forward per prompt chunk, as before newcomers' chunks were fed together."""
    tokenizer = model.tokenizer
    prompts = [tokenizer.encode(p) for p in prompt_texts(args)]
    engine = Engine(model, args.max_batch, 4 * args.num_requests, ServeMetrics(model.device),
                    args.max_step_tokens or None)
    if prefill_alone:
        from memwise.serve.scheduled import Scheduled
        engine.batch._prefill_chunks = functools.partial(Scheduled._prefill_chunks, engine.batch)
    clock = PhaseClock(engine.batch)
    engine.start()
    # Warm-up: one request alone (workspaces, first-call costs), not counted.
    Clients(engine, prompts, argparse.Namespace(**{**vars(args), "num_requests": 1, "max_concurrency": 1}),
            tokenizer, ()).run()
    clock.seconds.clear(), clock.cpu_seconds.clear(), clock.decode_sizes.clear()
    clock.prefill_calls = 0
    clock.chunk_sizes.clear()
    clients = Clients(engine, prompts, args, tokenizer, ())
    cpu = time.process_time()
    duration = clients.run()
    cpu = time.process_time() - cpu
    engine.stop()
    done = [r for r in clients.results if r["state"] == "completed"]
    steps = sum(clock.decode_sizes.values())
    decoded = sum(k * v for k, v in clock.decode_sizes.items())
    return {**_summary(done, duration), "process_cpu_s": cpu,
            "phase_s": {"decode": clock.seconds["_decode"], "prefill": clock.seconds[clock.prefill],
                        "step_other": clock.seconds["step"] - clock.seconds["_decode"] - clock.seconds[clock.prefill],
                        "outside_steps": duration - clock.seconds["step"]},
            "engine_thread_cpu_s": {"decode": clock.cpu_seconds["_decode"],
                                    "prefill": clock.cpu_seconds[clock.prefill]},
            "decode_steps": steps, "prefill_calls": clock.prefill_calls,
            "prefill_chunks_by_length": dict(sorted(clock.chunk_sizes.items())),
            "mean_decode_batch": decoded / max(steps, 1),
            "decode_tok_s_in_decode_forwards": decoded / max(clock.seconds["_decode"], 1e-9)}


def _summary(done: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    return {"requests": len(done), "duration_s": duration,
            "prompt_tokens_mean": sum(r["prompt_tokens"] or 0 for r in done) / max(len(done), 1),
            "decode_tok_s": decode_throughput(done),
            "output_tok_s": sum(r["output_tokens"] for r in done) / duration,
            "ttft_s": percentiles([r["ttft_s"] for r in done]),
            "itl_s": percentiles([g for r in done for g in r["itl_s"]])}


def _thread_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the process's main thread, the event loop's; of all its other threads)."""
    import psutil
    times = {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    main = times.pop(pid, 0.0)
    return main, sum(times.values())


def served_run(args: argparse.Namespace) -> dict[str, Any]:
    """The same load through `memwise serve` over HTTP (bench serve's client), with the CPU time of
    the server's event-loop thread, of its other threads (engine, OpenMP) and of this client."""
    from memwise.bench.serve_launch import LaunchedServer
    from memwise.bench.serve_load import LoadConfig, results_as_dicts, run_load

    prompts = prompt_texts(args)
    flags = ["--max-batch", str(args.max_batch), "--max-step-tokens", str(args.max_step_tokens)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    with LaunchedServer(args.model, args.model, flags) as server:
        assert server.proc is not None
        pid = server.proc.pid
        warm = LoadConfig(url=server.url, model=args.model, num_requests=1, max_concurrency=1,
                          max_tokens=args.max_tokens, seed=args.seed)
        run_load(warm, prompts)
        config = LoadConfig(url=server.url, model=args.model, num_requests=args.num_requests,
                            max_concurrency=args.max_concurrency, max_tokens=args.max_tokens, seed=args.seed)
        loop0, rest0 = _thread_cpu(pid)
        cpu = time.process_time()
        results, duration, _ = run_load(config, prompts)
        cpu = time.process_time() - cpu
        loop1, rest1 = _thread_cpu(pid)
        server.stop()
    done = [r for r in results_as_dicts(results) if r["state"] == "completed"]
    return {**_summary(done, duration), "client_cpu_s": cpu, "server_event_loop_cpu_s": loop1 - loop0,
            "server_other_threads_cpu_s": rest1 - rest0}


def same_process_offline(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The offline batch in this process: ceil(num_requests / max_batch) generations of max_batch
    prompts (bench serve's, left-padded) and max_tokens new tokens each, as `bench serve
    --offline-reference` runs them in a fresh process; rates are totals over the generations."""
    texts = prompt_texts(args)
    runs = -(-args.num_requests // args.max_batch)
    decode_s = prefill_s = 0.0
    tokens = 0
    for run in range(runs + 1):                 # the first is a warm-up
        batch = [texts[(run * args.max_batch + i) % len(texts)] for i in range(args.max_batch)]
        ids, mask = model.encode_batch(batch)
        start = time.perf_counter()
        first = None
        for step, _ in enumerate(model.stream(ids, args.max_tokens, mask, ignore_eos=True)):
            if step == 0:
                first = time.perf_counter()
        end = time.perf_counter()
        if run:
            prefill_s, decode_s = prefill_s + first - start, decode_s + end - first
            tokens += ids.shape[0] * (args.max_tokens - 1)
    return {"runs": runs, "decode_tok_s": tokens / decode_s, "prefill_s": prefill_s, "decode_s": decode_s}


def chunks_ab(model: Any, shapes: list[tuple[int, int]], rounds: int = 5) -> dict[str, float]:
    """B prompt chunks of T tokens through the model one by one over together in one forward: the
    median, over alternating rounds, of the time ratio (> 1: together is faster)."""
    import statistics
    import torch
    module = model.module

    def run(b: int, t: int, together: bool) -> float:
        ids = torch.randint(0, model.spec.vocab_size, (b, t), generator=torch.Generator().manual_seed(b * t))
        cache = module.new_cache(b)
        start = time.perf_counter()
        with torch.inference_mode():
            if together:
                module(ids, cache, torch.ones_like(ids, dtype=torch.bool), last_only=True)
            else:
                for row in range(b):
                    own = type(cache)(cache.state[:, row:row + 1].clone())
                    module(ids[row:row + 1], own, torch.ones_like(ids[row:row + 1], dtype=torch.bool), last_only=True)
        return time.perf_counter() - start
    out = {}
    for b, t in shapes:
        run(b, t, True), run(b, t, False)
        out[f"{b}x{t}"] = statistics.median(run(b, t, False) / run(b, t, True) for _ in range(rounds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preset:mmfree-370m")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-step-tokens", type=int, default=128, help="0: whole prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-tokens", type=int, help="as bench serve's: prompts cut to N tokens")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--served", action="store_true",
                        help="also run the load through memwise serve over HTTP, after the engine-only run")
    parser.add_argument("--compare-prefill", action="store_true",
                        help="each round also runs the engine with one forward per prompt chunk (the old way)")
    parser.add_argument("--chunks-ab", action="store_true",
                        help="only time B chunks of T tokens one by one vs together (4x28, 8x14, 2x56, 4x63)")
    parser.add_argument("--rounds", type=int, default=1, help="engine-only [and served] runs, alternating")
    parser.add_argument("--offline-reference", action="store_true")
    parser.add_argument("--same-process-offline", action="store_true",
                        help="each round also runs the offline batch in this process, right after the engine")
    args = parser.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model = memwise.load(args.model)
    if args.chunks_ab:
        print(json.dumps({"alone_over_together_time": chunks_ab(model, [(4, 28), (8, 14), (2, 56), (4, 63)])}))
        return
    report: dict[str, Any] = {"model": args.model, "memwise": memwise.__file__, "rounds": []}
    print(json.dumps({"memwise": memwise.__file__}), flush=True)
    for _ in range(args.rounds):
        one = {"engine": engine_run(model, args)}
        if args.same_process_offline:
            one["offline_same_process"] = same_process_offline(model, args)
            one["engine_over_offline_same_process"] = (one["engine"]["decode_tok_s"]
                                                       / one["offline_same_process"]["decode_tok_s"])
        if args.compare_prefill:
            one["engine_prefill_alone"] = engine_run(model, args, prefill_alone=True)
            one["together_over_alone"] = one["engine"]["decode_tok_s"] / one["engine_prefill_alone"]["decode_tok_s"]
        if args.served:
            one["served"] = served_run(args)
            one["served_over_engine"] = one["served"]["decode_tok_s"] / one["engine"]["decode_tok_s"]
        report["rounds"].append(one)
        print(json.dumps(one, indent=1), flush=True)
    if args.offline_reference:
        done = [{"prompt_tokens": round(report["rounds"][0]["engine"]["prompt_tokens_mean"])}]
        ref = offline_reference(args.model, args.max_batch, done, args.max_tokens, args.threads, "cpu", None)
        report["offline_reference"] = ref
        if ref.get("decode_tok_s"):
            report["engine_over_offline_decode"] = [r["engine"]["decode_tok_s"] / ref["decode_tok_s"]
                                                    for r in report["rounds"]]
        print(json.dumps({k: report[k] for k in ("offline_reference", "engine_over_offline_decode") if k in report},
                         indent=1))


if __name__ == "__main__":
    main()
