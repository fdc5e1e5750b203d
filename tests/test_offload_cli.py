"""The offload flags of memwise generate, estimate and bench."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def memwise(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = "import sys; from memwise.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def test_generate_streams_the_same_tokens(tmp_path):
    common = ("generate", "preset:tiny-llama", "--prompt", "Hello", "--max-new-tokens", "8", "--ignore-eos")
    plain = memwise(*common)
    offloaded = memwise(*common, "--max-memory", "3.8MiB", "--offload-dir", str(tmp_path))
    assert plain.returncode == 0 and offloaded.returncode == 0, offloaded.stderr
    assert "0 of 2 layers resident, 2 streamed" in offloaded.stderr and "O_DIRECT" in offloaded.stderr
    text = lambda run: run.stdout.strip().splitlines()[0]
    assert text(offloaded) == text(plain)


def test_generate_budget_too_small_is_one_line(tmp_path):
    run = memwise("generate", "preset:tiny-llama", "--prompt", "Hi", "--max-memory", "40KiB",
                  "--offload-dir", str(tmp_path / "off"))
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert run.stderr.startswith("memwise: error: max_memory 40.0 KiB is below what preset:tiny-llama needs to "
                                 "stream: 3.8 MiB")
    assert not (tmp_path / "off").exists()


def test_estimate_counts_what_the_plan_keeps():
    from memwise.offload.decoder import budget_plan
    from memwise.source import resolve_model
    full = json.loads(memwise("estimate", "preset:opt-2.7b", "--json").stdout)["breakdown"]
    offloaded = json.loads(memwise("estimate", "preset:opt-2.7b", "--json", "--max-memory", "2GiB").stdout)
    plan = budget_plan(resolve_model("preset:opt-2.7b").spec, torch.float32, None, 2 * 2**30)
    # opt-2.7b in float32 under 2 GiB: the non-layer weights, 1 resident layer and 2 buffers
    assert (plan.resident, plan.buffers) == (1, 2)
    assert offloaded["breakdown"]["weights"] == plan.fixed + 3 * plan.layer < full["weights"] / 5
    assert offloaded["breakdown"]["kv_cache"] == full["kv_cache"]
    assert any("1 of 32 layers resident" in note for note in offloaded["notes"])
    bad = memwise("estimate", "preset:opt-2.7b", "--max-memory", "1GiB")
    assert bad.returncode == 1 and "is below what preset:opt-2.7b needs to stream: 1.28 GiB" in bad.stderr


def test_bench_cell_loads_offloaded(tmp_path):
    from memwise.bench.cell import CellSpec, run_cell
    from memwise.bench.sources import resolve
    source = resolve("preset:tiny-llama")
    from dataclasses import asdict
    spec = CellSpec(model="tiny-llama", source=asdict(source), engine="memwise", batch_size=1, prompt_tokens=8,
                    new_tokens=4, runs=1, warmup=0, max_memory="3.8MiB", offload_dir=str(tmp_path))
    record = run_cell(spec)
    assert record["status"] == "ok", record["reason"]
    assert record["max_memory"] == "3.8MiB" and list(tmp_path.glob("*.mwoff"))
    assert torch.get_num_threads() >= 1
