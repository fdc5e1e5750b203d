"""One benchmark cell, run in a process of its own: `python -m memwise.bench.cell SPEC_JSON` (or "-" and
the spec on stdin) prints one JSON record as the last line of stdout.

A fresh process per cell means no cell's memory or caches depend on which cells ran before it. The
timed load starts before the interpreter does (see MEMWISE_BENCH_SPAWN_TIME below) and so includes
importing torch, the engine's libraries and the model code: what a user waits for too.

Phases, as the design's "Measuring" section defines a cell: import and load (timed; resident set
after load and the load peak recorded), reset of the high-water mark, warm-up generations at the
same shapes, then the timed runs. Each run gives TTFT (prefill and the first token) and e2e; decode
is e2e - TTFT over the remaining new_tokens - 1 tokens.

With busy_cores (`--busy-cores N`) every warm-up and timed run happens twice, once as usual and once
beside N busy processes (bench/busy.py), back to back in alternating order; the record holds both
and the ratios of their speeds.
"""
from __future__ import annotations

import time

MODULE_START = time.time()  # the start of load_s when the launcher did not pass one

import json
import os
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass
from typing import Any

from memwise.bench import memory

# The record's fields, in the order results.csv and the docs list them.
TIMED_METRICS = ("ttft_s", "prefill_tok_s", "tpot_s", "decode_tok_s", "e2e_s")
RECORD_FIELDS = (
    "model", "engine", "weights", "dtype", "quantize", "kv_cache", "device", "batch_size", "prompt_tokens", "new_tokens",
    "status", "reason", "load_s",
    *[f"{m}{suffix}" for m in TIMED_METRICS for suffix in ("", "_min", "_max", "_samples")],
    "peak_rss_bytes", "predicted_peak_bytes", "load_peak_rss_bytes", "rss_after_load_bytes", "weights_bytes",
    "cuda_max_allocated_bytes", "decode_ceiling_tok_s", "decode_bytes_per_token",
    # beside the required fields: where the numbers come from
    "source", "model_type", "runs", "warmup", "threads", "import_s", "prompt_ids", "prompt_tokens_samples",
    "new_tokens_samples", "peak_reset",
    "estimated_bytes", "outside_max_rss_bytes", "outside_wait4_max_rss_bytes", "wall_s",
    # with --busy-cores: the same runs again beside busy processes (bench/busy.py)
    "busy_cores", *[f"busy_{m}{suffix}" for m in TIMED_METRICS for suffix in ("", "_min", "_max", "_samples")],
    "busy_prefill_ratio", "busy_decode_ratio",
    # engines other than memwise's: what exactly ran (a GGUF type) and the engine's own timers
    "weights_format", "engine_details", "engine_prefill_s", "engine_tpot_s", "engine_tpot_share",
    "engine_counters_samples",
)


def peak_bytes(record: dict[str, Any]) -> int | None:
    """The cell's peak resident set over its whole life: the larger of the load and generation peaks."""
    values = [v for v in (record.get("peak_rss_bytes"), record.get("load_peak_rss_bytes")) if v is not None]
    return max(values) if values else None


@dataclass
class CellSpec:
    """Everything a cell process needs; crosses the process boundary as JSON."""

    model: str
    source: dict[str, Any]              # sources.Source fields: source, kind, weights, config, name
    engine: str
    dtype: str = "float32"
    quantize: str | None = None         # memwise engines: a weight scheme (memwise.quantization)
    kv_cache: str | None = None         # memwise engines: a KV cache scheme (memwise.kernels.kv_quant)
    device: str = "cpu"
    batch_size: int = 1
    prompt_tokens: int = 128
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    threads: int | None = None
    seed: int = 0
    # Real prompts instead of synthetic ids: token ids per prompt, cycled over the runs (the warm-up
    # uses the first), each generating max_length - len(prompt) new tokens.
    prompts: list[list[int]] | None = None
    prompt_ids_note: str | None = None
    max_length: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    estimated_bytes: int | None = None
    predicted_peak_bytes: int | None = None   # memwise.estimate's prediction of peak_bytes(record)
    busy_cores: int = 0                 # processes that keep cores busy beside each timed run (bench/busy.py)
    engine_file: str | None = None      # what the engine prepared in the parent (llama.cpp: the GGUF file)
    max_memory: str | None = None       # memwise engine: offloaded under this budget into offload_dir
    offload_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CellSpec":
        return cls(**data)


def blank_record(spec: CellSpec) -> dict[str, Any]:
    """A record with every field present (None where not measured), filled from the spec."""
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(
        model=spec.model, engine=spec.engine, weights=spec.source.get("weights"), dtype=spec.dtype, quantize=spec.quantize,
        kv_cache=spec.kv_cache, device=spec.device, batch_size=spec.batch_size, prompt_tokens=spec.prompt_tokens,
        new_tokens=spec.new_tokens, status="error", reason=None, source=spec.source.get("source"),
        model_type=(spec.source.get("config") or {}).get("model_type"), runs=spec.runs, warmup=spec.warmup,
        threads=spec.threads, estimated_bytes=spec.estimated_bytes,
        predicted_peak_bytes=spec.predicted_peak_bytes,
        prompt_ids=spec.prompt_ids_note or "synthetic (seeded uniform ids)",
    )
    if spec.max_memory is not None:
        record["max_memory"] = spec.max_memory
    return record


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def summarize(record: dict[str, Any], name: str, samples: list[float | None]) -> None:
    """Median into name, min/max and the raw samples beside it (None where a run has no value)."""
    values = [s for s in samples if s is not None]
    record[f"{name}_samples"] = samples
    if values:
        record[name] = statistics.median(values)
        record[f"{name}_min"] = min(values)
        record[f"{name}_max"] = max(values)


def _plan(spec: CellSpec) -> list[tuple[int, int]]:
    """(prompt index or -1 for synthetic ids, new tokens) for each warm-up and timed run."""
    total = spec.warmup + spec.runs
    if not spec.prompts:
        return [(-1, spec.new_tokens)] * total
    plan = []
    for i in range(total):
        index = 0 if i < spec.warmup else (i - spec.warmup) % len(spec.prompts)
        length = len(spec.prompts[index])
        new = spec.max_length - length if spec.max_length else spec.new_tokens
        plan.append((index, max(new, 1)))
    return plan


def run_cell(spec: CellSpec) -> dict[str, Any]:
    """Load, warm up and time one cell in this process; never raises (errors become the record's status)."""
    record = blank_record(spec)
    try:
        _measure(spec, record)
    except Exception as e:
        record["status"] = "error"
        record["reason"] = one_line(e)
        print(traceback.format_exc(), file=sys.stderr)
    return record


def _measure(spec: CellSpec, record: dict[str, Any]) -> None:
    from memwise.bench.sources import Source

    # The launcher notes the wall-clock time right before it starts this process, so load_s covers the
    # interpreter's start and every import, whatever the memwise package imports eagerly.
    spawned = os.environ.get("MEMWISE_BENCH_SPAWN_TIME")
    start = float(spawned) if spawned else MODULE_START
    import memwise.bench.engines as engines

    engine = engines.engine_named(spec.engine)
    uses_torch = getattr(engine, "uses_torch", True)
    if uses_torch:
        import torch  # the import is part of what a user waits for, and part of the timed load

        if spec.threads:
            torch.set_num_threads(spec.threads)
        record["threads"] = torch.get_num_threads()
        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {spec.device!r} requested but torch sees no CUDA device")
    configure = getattr(engine, "configure", None)
    if configure is not None:
        configure(spec)
    source = Source(**{k: v for k, v in spec.source.items() if k in Source.__dataclass_fields__})
    record["import_s"] = time.time() - start
    options = {name: value for name, value in (("quantize", spec.quantize), ("kv_cache", spec.kv_cache)) if value}
    if spec.max_memory is not None:
        options.update(max_memory=spec.max_memory, offload_dir=spec.offload_dir)
    engine.load(source, spec.dtype, spec.device, **options)
    _wait(spec.device)
    record["load_s"] = time.time() - start
    record["rss_after_load_bytes"] = memory.current_rss_bytes()
    record["load_peak_rss_bytes"] = memory.peak_rss_bytes()
    record["weights_bytes"] = engine.weights_bytes()
    record["decode_bytes_per_token"] = engine.decode_bytes_per_token()
    describe = getattr(engine, "describe", None)
    if describe is not None:
        record.update(describe())
    record["peak_reset"] = memory.reset_peak_rss()
    if spec.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()

    synthetic_ids, prompt_ids = _inputs(spec, engine.vocab_size(), uses_torch)
    if not uses_torch:
        record["prompt_ids"] = spec.prompt_ids_note or "synthetic (seeded uniform ids, numpy)"
    samples, busy_samples, lengths, counters = _timed_runs(spec, engine, synthetic_ids, prompt_ids, uses_torch)
    record["peak_rss_bytes"] = memory.peak_rss_bytes()
    if spec.device.startswith("cuda"):
        import torch

        record["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    for name, values in samples.items():
        summarize(record, name, values)
    if counters:
        _engine_check(record, counters)
    if spec.busy_cores:
        _summarize_busy(record, spec.busy_cores, samples, busy_samples)
    prompt_lengths, new_lengths = lengths
    if prompt_lengths:   # real prompts differ in length; synthetic ones all have the requested shape
        record["prompt_tokens"] = int(statistics.median(prompt_lengths))
        record["new_tokens"] = int(statistics.median(new_lengths))
        record["prompt_tokens_samples"] = prompt_lengths
        record["new_tokens_samples"] = new_lengths
    _offload_plan(record, engine)
    record["status"] = "ok"


def _offload_plan(record: dict[str, Any], engine: Any) -> None:
    """An offloaded memwise run: the plan it ran (memwise.offload.runtime) and its predicted throughput
    next to the measured one (generated tokens / end-to-end seconds, prefill included)."""
    runtime = getattr(getattr(getattr(engine, "model", None), "module", None), "offload_runtime", None)
    run = runtime.last if runtime is not None else None
    if run is None:
        return
    record["offload_micro_batches"] = run.micro_batches
    record["offload_resident_layers"] = run.resident_layers
    if run.policy is None:
        record["offload_plan"] = f"none: {run.reason}"
        return
    record["offload_plan"] = run.policy.to_json()
    predicted = run.policy.predicted_tokens_per_s
    record["predicted_tokens_per_s"] = predicted
    if record.get("e2e_s"):
        measured = record["batch_size"] * record["new_tokens"] / record["e2e_s"]
        record["measured_tokens_per_s"] = measured
        record["measured_over_predicted"] = measured / predicted


class _Request:
    """Greedy, EOS ignored, exactly max_new_tokens: what the bench asks of an engine without torch
    (memwise's GenerationOptions lives with torch)."""

    def __init__(self, new_tokens: int):
        self.max_new_tokens = self.min_new_tokens = new_tokens
        self.ignore_eos = True


def _inputs(spec: CellSpec, vocab: int, uses_torch: bool) -> tuple[Any, list[Any]]:
    """Synthetic ids [batch, prompt] (seeded uniform) and the real prompts' ids, as the engine takes them."""
    if not uses_torch:
        import numpy as np

        generator = np.random.default_rng(spec.seed)
        synthetic = generator.integers(0, vocab, (spec.batch_size, spec.prompt_tokens))
        return synthetic, [np.array([p] * spec.batch_size) for p in (spec.prompts or [])]
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    synthetic = torch.randint(0, vocab, (spec.batch_size, spec.prompt_tokens), generator=generator)
    return synthetic, [torch.tensor([p] * spec.batch_size, dtype=torch.long) for p in (spec.prompts or [])]


def _options(spec: CellSpec, new_tokens: int, uses_torch: bool) -> Any:
    if not uses_torch:
        return _Request(new_tokens)
    from memwise.generate import GenerationOptions

    rules = {k: v for k, v in (("repetition_penalty", spec.repetition_penalty),
                               ("no_repeat_ngram_size", spec.no_repeat_ngram_size)) if v is not None}
    # min_new_tokens = max_new_tokens keeps EOS out until the end: every run has the requested length.
    return GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens, ignore_eos=True, **rules)


def _conditions(spec: CellSpec, i: int) -> list[bool]:
    """Whether run i goes with busy processes: without --busy-cores never; with it, each run twice,
    without and with, in alternating order so that a machine that speeds up or slows down over the
    cell moves both alike."""
    if not spec.busy_cores:
        return [False]
    return [False, True] if i % 2 == 0 else [True, False]


def _add_samples(samples: dict[str, list[float | None]], timing: Any, batch: int, prompt: int,
                 new_tokens: int) -> None:
    decode_s = timing.e2e_s - timing.ttft_s
    samples["ttft_s"].append(timing.ttft_s)
    samples["e2e_s"].append(timing.e2e_s)
    samples["prefill_tok_s"].append(batch * prompt / timing.ttft_s if timing.ttft_s > 0 else None)
    # With one new token there is no decode phase: TPOT and decode tok/s are undefined, not 0.
    steps = new_tokens - 1
    samples["tpot_s"].append(decode_s / steps if steps > 0 else None)
    samples["decode_tok_s"].append(batch * steps / decode_s if steps > 0 and decode_s > 0 else None)


def _timed_runs(spec: CellSpec, engine: Any, synthetic_ids: Any, prompt_ids: list[Any], uses_torch: bool):
    """Warm-up and timed generations: (samples, samples beside busy processes, (prompt, new) lengths,
    the engine's own counters per timed run where it has them)."""
    from memwise.bench.busy import BusyLoad

    samples: dict[str, list[float | None]] = {m: [] for m in TIMED_METRICS}
    busy_samples: dict[str, list[float | None]] = {m: [] for m in TIMED_METRICS}
    counters: list[dict[str, Any]] = []
    prompt_lengths, new_lengths = [], []
    for i, (index, new_tokens) in enumerate(_plan(spec)):
        ids = synthetic_ids if index < 0 else prompt_ids[index]
        options = _options(spec, new_tokens, uses_torch)
        for busy in _conditions(spec, i):
            with BusyLoad(spec.busy_cores if busy else 0):
                timing = engine.generate(ids, options)
            if timing.new_tokens != new_tokens:
                raise RuntimeError(f"{spec.engine} generated {timing.new_tokens} tokens, expected {new_tokens} "
                                   f"(EOS should be ignored)")
            if i >= spec.warmup:
                _add_samples(busy_samples if busy else samples, timing, *ids.shape, new_tokens)
                if not busy and getattr(timing, "counters", None) is not None:
                    counters.append(timing.counters)
        if i >= spec.warmup:
            prompt_lengths.append(ids.shape[1])
            new_lengths.append(new_tokens)
    return samples, busy_samples, (prompt_lengths, new_lengths), counters


def _engine_check(record: dict[str, Any], counters: list[dict[str, Any]]) -> None:
    """The engine's own timers beside ours (llama.cpp's llama_perf_context): its prompt evaluation next to
    TTFT, its time per evaluated token next to TPOT; engine_tpot_share = engine_tpot_s / tpot_s, near 1
    when the measured decode is the engine's evaluation and not the harness's overhead."""
    record["engine_counters_samples"] = counters
    summarize(record, "engine_prefill_s", [c["t_p_eval_ms"] / 1000 for c in counters])
    summarize(record, "engine_tpot_s", [c["t_eval_ms"] / 1000 / c["n_eval"] if c["n_eval"] else None
                                        for c in counters])
    if record.get("engine_tpot_s") and record.get("tpot_s"):
        record["engine_tpot_share"] = record["engine_tpot_s"] / record["tpot_s"]


def _summarize_busy(record: dict[str, Any], cores: int, samples: dict[str, list[float | None]],
                    busy_samples: dict[str, list[float | None]]) -> None:
    """busy_<metric> beside each metric, and busy_<speed>_ratio: the median over pairs of runs (one
    without, one with busy processes, run back to back) of the speed with them over the speed without."""
    record["busy_cores"] = cores
    for name, values in busy_samples.items():
        summarize(record, f"busy_{name}", values)
    for name in ("prefill_tok_s", "decode_tok_s"):
        ratios = [b / a for a, b in zip(samples[name], busy_samples[name]) if a and b is not None]
        record[f"busy_{name.removesuffix('_tok_s')}_ratio"] = statistics.median(ratios) if ratios else None


def _wait(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = sys.stdin.read() if not argv or argv[0] == "-" else argv[0]
    # Libraries may print to stdout; the record must be the last line there, so everything else
    # goes to stderr while the cell runs.
    record_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        spec = CellSpec.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError) as e:
        print(json.dumps({"status": "error", "reason": f"bad cell spec: {one_line(e)}"}), file=record_out)
        return 2
    record = run_cell(spec)
    print(json.dumps(record), file=record_out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
