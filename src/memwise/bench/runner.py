"""Running a matrix: resolve sources, decide what can run, and run each cell in a fresh process.

Before a cell starts, the parent answers three questions without loading anything: can the engine run
this model at all (engines.can_run), do prompt + new tokens fit the model's learned positions, and
does the predicted peak (memwise.estimate; memory.estimate_cell_bytes for models it has no formulas
for) fit the memory available now. A "no" becomes a skipped record with the reason; the CLI instead
refuses the whole run before the first cell unless --force (RunOptions.over_memory). A cell that
fails or dies becomes an error record; the run goes on. Every record carries predicted_peak_bytes.

Each cell is started by a small launcher process (launcher.py says why) that samples the cell's
resident set while it runs and reads its ru_maxrss with wait4 when it exits. The cell resets its own
high-water mark after loading, and ru_maxrss is that same mark, so ru_maxrss alone covers generation
only; the sampled maximum covers the load too. Both go into the record (outside_wait4_max_rss_bytes,
outside_max_rss_bytes) as a check on the cell's own figures.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from memwise.bench import memory
from memwise.bench.cell import CellSpec, blank_record
from memwise.bench.engines import engine_named
from memwise.bench.sources import Source, resolve
from memwise.bench.suites import Matrix
from memwise.dtypes import DTYPES
from memwise.quantization import SCHEMES
from memwise.errors import MemwiseError

@dataclass
class RunOptions:
    threads: int | None = None
    device: str = "cpu"
    timeout_s: float | None = None      # per cell; None waits as long as it takes
    log_dir: Path | None = None         # each cell's stderr, when given
    seed: int = 0
    busy_cores: int = 0                 # busy processes beside each timed run (bench/busy.py)
    quantize: str | None = None         # weight scheme of the memwise engines' cells
    kv_cache: str | None = None         # KV cache scheme of the memwise engines' cells
    max_memory: str | None = None       # memwise cells: offloaded under this budget (memwise.offload)
    offload_dir: str | None = None
    # A cell predicted not to fit the memory available: "skip" it (a skipped record), "refuse" the
    # whole run before any cell starts (the CLI), or "force" it to run anyway (the CLI's --force).
    over_memory: str = "skip"


def resolve_sources(models: list[str]) -> dict[str, Source]:
    """Every --model resolved before anything runs, so a typo fails in a second, not after an hour."""
    sources = {}
    for text in models:
        source = resolve(text)
        if source.problem:
            raise MemwiseError(f"--model {text}: {source.problem}")
        sources[text] = source
    return sources


def approximate_token_count(text: str) -> int:
    """Words and punctuation marks: close to a BPE count for plain English, used only without a tokenizer."""
    return max(len(re.findall(r"\w+|[^\w\s]", text)), 1)


def prompt_ids(source: Source, prompts: list[str], vocab_size: int, seed: int) -> tuple[list[list[int]], str]:
    """Token ids of real prompts: from the model's tokenizer, or (synthetic weights, no tokenizer)
    seeded random ids of the approximate length, with a note saying which."""
    if source.kind != "preset":
        from memwise.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(source.source), (source.config or {}).get("bos_token_id"))
        if tokenizer is not None:
            return [tokenizer.encode(p) for p in prompts], "tokenized prompts"
    import random

    rng = random.Random(seed)
    ids = [[rng.randrange(vocab_size) for _ in range(approximate_token_count(p))] for p in prompts]
    return ids, "random ids of each prompt's approximate length (no tokenizer for synthetic weights)"


def skip_reason(source: Source, engine: str, spec: CellSpec, arch: memory.Architecture,
                force: bool = False) -> str | None:
    """Why this cell should not be started, or None."""
    runner = engine_named(engine)
    if spec.dtype not in DTYPES and not hasattr(runner, "prepare"):
        return f"dtype {spec.dtype} is a GGUF type: only llama.cpp cells run it"
    reason = runner.can_run(source, spec.device)
    cell_reason = getattr(runner, "cell_reason", None)
    if not reason and cell_reason is not None:
        reason = cell_reason(spec)
    if reason:
        return reason
    longest = spec.prompt_tokens + spec.new_tokens
    if spec.prompts:
        longest = max(spec.max_length or 0, max(len(p) for p in spec.prompts) + 1)
    if arch.max_positions and longest > arch.max_positions:
        return (f"prompt + new tokens ({longest}) exceed the model's {arch.max_positions} learned positions")
    available = memory.available_memory_bytes()
    needed = spec.predicted_peak_bytes or spec.estimated_bytes
    if not force and needed is not None and needed > available:
        return (f"estimated peak {needed / 2**30:.1f} GiB exceeds the "
                f"{available / 2**30:.1f} GiB of memory available")
    return None


def predicted_peak(source: Source, engine: str, dtype: str, quantize: str | None, batch: int, prompt: int,
                   new: int, device: str, max_memory: str | None = None, kv_cache: str | None = None) -> int | None:
    """memwise.estimate's predicted peak of a cell (computed here, in the parent: nothing is loaded),
    or None for a model or engine it has no formulas for."""
    from memwise.estimate import estimate_inference
    from memwise.source import ModelSource, family_and_spec

    try:
        family, spec = family_and_spec(source.config or {}, source.source)
        directory = Path(source.source) if source.kind == "local" else None
        model = ModelSource(source.config or {}, source.source, family, spec, directory)
        budget = None
        if max_memory is not None:
            from memwise.offload.budget import parse_size
            budget = parse_size(max_memory, "--max-memory")
        return estimate_inference(model, batch_size=batch, prompt_tokens=max(prompt, 1), new_tokens=max(new, 1),
                                  dtype=dtype, quantize=quantize, engine=engine,
                                  device=device, max_memory=budget, kv_cache=kv_cache).predicted_peak_bytes
    except MemwiseError:
        return None


def refuse_over_memory(planned: list[tuple[CellSpec, Source, memory.Architecture]]) -> None:
    """The memory gate of a whole run: one line naming the first runnable cell predicted not to fit."""
    from memwise.estimate.breakdown import Estimate
    from memwise.estimate.gate import check_predicted_peak

    for spec, source, arch in planned:
        if spec.predicted_peak_bytes is None or engine_named(spec.engine).can_run(source, spec.device):
            continue
        what = (f"bench cell {spec.model} · {spec.engine} · {spec.dtype} · batch {spec.batch_size} · "
                f"{spec.prompt_tokens}+{spec.new_tokens} tokens")
        device = "cuda" if spec.device.startswith("cuda") else "cpu"
        check_predicted_peak(what, Estimate("inference", {}, {"predicted": spec.predicted_peak_bytes}), device)


def plan_cells(matrix: Matrix, sources: dict[str, Source],
               options: RunOptions) -> list[tuple[CellSpec, Source, memory.Architecture]]:
    """The matrix's cells as specs, in run order, with each model's prompts tokenized once."""
    archs = {text: memory.architecture(source.config or {}) for text, source in sources.items()}
    prompts: dict[str, tuple[list[list[int]], str]] = {}
    if matrix.prompts:
        for text, source in sources.items():
            prompts[text] = prompt_ids(source, matrix.prompts, archs[text].vocab_size, options.seed)
    planned = []
    for model, engine, dtype, batch, prompt, new in matrix.cells():
        source, arch = sources[model], archs[model]
        ids, note = prompts.get(model, (None, None))
        if ids:
            prompt = max(len(p) for p in ids)
            new = max((matrix.max_length or 0) - min(len(p) for p in ids), 1)
        quantize = options.quantize if engine == "memwise" else None
        kv_cache = options.kv_cache if engine == "memwise" else None
        offload = {"max_memory": options.max_memory, "offload_dir": options.offload_dir} if engine == "memwise" else {}
        if engine == "memwise" and dtype in SCHEMES:   # a suite's quantized cell: the scheme in the dtype slot
            dtype, quantize = "float32", dtype
        weights = None
        if engine.startswith("memwise") and dtype in DTYPES:
            weights = memory.memwise_weights_bytes(source.config or {}, dtype, quantize)
        spec = CellSpec(
            model=source.name, source=asdict(source), engine=engine, dtype=dtype, quantize=quantize,
            kv_cache=kv_cache, device=options.device, batch_size=batch, prompt_tokens=prompt, new_tokens=new, runs=matrix.runs,
            warmup=matrix.warmup, threads=options.threads, seed=options.seed, prompts=ids,
            prompt_ids_note=note, max_length=matrix.max_length, repetition_penalty=matrix.repetition_penalty,
            no_repeat_ngram_size=matrix.no_repeat_ngram_size,
            estimated_bytes=memory.estimate_cell_bytes(arch, engine, dtype, batch, prompt, new, weights),
            busy_cores=options.busy_cores, **offload,
            predicted_peak_bytes=predicted_peak(source, engine, dtype, quantize, batch, prompt, new, options.device,
                                                offload.get("max_memory"), kv_cache),
        )
        planned.append((spec, source, arch))
    return planned


def _child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    # The cell must import this very memwise, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # Sources are resolved to local directories or presets before any cell runs: no cell may
    # spend its timed load on the network.
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_cell_process(spec: CellSpec, timeout_s: float | None = None, log_path: Path | None = None) -> dict[str, Any]:
    """Run one cell in a fresh interpreter (through the small launcher) and return its record, with
    the memory seen from outside added."""
    launcher = Path(__file__).with_name("launcher.py")
    with tempfile.TemporaryDirectory(prefix="memwise-bench-") as tmp:
        result_path = Path(tmp) / "outside.json"
        out_path = Path(tmp) / "stdout"
        err_path = log_path or Path(tmp) / "stderr"
        # -I: the launcher must not import anything from its own directory or the environment
        command = [sys.executable, "-I", str(launcher), str(result_path),
                   sys.executable, "-m", "memwise.bench.cell", "-"]
        started = time.perf_counter()
        timed_out = False
        with open(out_path, "w") as out, open(err_path, "w") as err:
            # A session of its own, so a timeout can kill the launcher and the cell together.
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True,
                                    env=_child_env(spec.threads), start_new_session=True)
            assert proc.stdin is not None
            proc.stdin.write(spec.to_json())
            proc.stdin.close()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.perf_counter() - started
        stdout, stderr = out_path.read_text(), err_path.read_text()
        outside = json.loads(result_path.read_text()) if result_path.is_file() else {}

    record = _parse_record(stdout)
    returncode = outside.get("returncode", proc.returncode)
    if record is None:
        record = blank_record(spec)
        if timed_out:
            record["reason"] = f"timed out after {timeout_s:g} s"
        elif returncode < 0:
            name = signal.Signals(-returncode).name
            hint = " (out of memory?)" if returncode == -signal.SIGKILL else ""
            record["reason"] = f"cell process died of {name}{hint}"
        else:
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            record["reason"] = f"cell process exited {returncode}: " + (lines[-1] if lines else "no output")
    wait4_peak = outside.get("wait4_max_rss_bytes")
    polled = outside.get("polled_max_rss_bytes") or 0
    record["outside_wait4_max_rss_bytes"] = wait4_peak
    record["outside_max_rss_bytes"] = max(polled, wait4_peak or 0) or None
    record["wall_s"] = wall
    return record


def _parse_record(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "status" in record and "model" in record:
            return record
    return None


def add_decode_ceilings(records: list[dict[str, Any]], bandwidth: float | None) -> None:
    """decode_ceiling_tok_s = batch * bandwidth / bytes read per step: each decode step reads its
    weights once for the whole batch, so no engine can decode faster than this from memory (caches aside)."""
    for record in records:
        per_step = record.get("decode_bytes_per_token") or record.get("weights_bytes")
        if bandwidth and per_step:
            record["decode_ceiling_tok_s"] = record["batch_size"] * bandwidth / per_step


def run_matrix(matrix: Matrix, options: RunOptions,
               on_start: Callable[[int, int, CellSpec], None] | None = None,
               on_done: Callable[[int, int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every cell of the matrix, run or skipped, in order. Callbacks drive the progress display."""
    sources = resolve_sources(list(dict.fromkeys(matrix.models)))
    planned = plan_cells(matrix, sources, options)
    if options.over_memory == "refuse":
        refuse_over_memory(planned)
    records = []
    for i, (spec, source, arch) in enumerate(planned):
        if on_start:
            on_start(i, len(planned), spec)
        reason = skip_reason(source, spec.engine, spec, arch, force=options.over_memory == "force")
        problem = None if reason else _prepare(spec, source)
        if reason or problem:
            record = blank_record(spec)
            record.update(status="skipped" if reason else "error", reason=reason or problem)
        else:
            log_path = None
            if options.log_dir is not None:
                options.log_dir.mkdir(parents=True, exist_ok=True)
                log_path = options.log_dir / f"{i + 1:02d}-{_slug(spec.model)}-{spec.engine}.log"
            record = run_cell_process(spec, options.timeout_s, log_path)
        records.append(record)
        if on_done:
            on_done(i, len(planned), record)
    return records


def _prepare(spec: CellSpec, source: Source) -> str | None:
    """Let the engine make what its cell loads (llama.cpp: the GGUF file), here and untimed; the one-line
    reason when that fails."""
    prepare = getattr(engine_named(spec.engine), "prepare", None)
    if prepare is None:
        return None
    try:
        spec.engine_file = prepare(source, spec)
    except Exception as e:  # like a failed cell: this cell becomes an error record and the run goes on
        lines = str(e).strip().splitlines()
        return f"preparing the {spec.engine} cell failed: {lines[0] if lines else type(e).__name__}"
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)
