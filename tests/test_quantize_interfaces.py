"""--quantize through the interfaces: memwise generate, memwise info, and the bench engine's record."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memwise.bench.cell import CellSpec, run_cell
from memwise.bench.sources import resolve


def memwise(*args, timeout=300):
    # wide, so that rich does not wrap table cells
    return subprocess.run([sys.executable, "-m", "memwise.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_generate_with_a_scheme(scheme):
    run = memwise("generate", "preset:tiny-llama", "--prompt", "hi", "--max-new-tokens", "4", "--ignore-eos",
                  "--quantize", scheme, "--threads", "1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("[4 tokens | TTFT")


def test_generate_with_an_unknown_scheme_is_one_line():
    run = memwise("generate", "preset:tiny-gpt2", "--prompt", "hi", "--quantize", "int3")
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0
    assert "unknown quantization scheme 'int3' (known: int8, int4, nf4)" in run.stderr
    run = memwise("generate", "preset:tiny-mmfree", "--prompt", "hi", "--quantize", "int8")
    assert run.returncode == 1 and "already ternary" in run.stderr and "Traceback" not in run.stderr


def test_info_lists_bytes_per_parameter_and_schemes():
    run = memwise("info", "preset:gpt2-medium")
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    for expected in ("float32 (4 B/param)", "bfloat16 (2 B/param)", "quantize=int8", "344.38 MiB",
                     "quantize=int4", "216.69 MiB (0.5625 B/weight", "quantize=nf4", "203.26 MiB (0.516 B/weight",
                     "token embedding and lm_head int8, one table when tied"):
        assert expected in text, expected
    text = " ".join(memwise("info", "preset:tiny-mmfree").stdout.split())
    assert "0.25 B/weight in ternary matrices" in text and "already ternary" in text


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_bench_engine_records_the_scheme(scheme):
    source = resolve("preset:tiny-gpt2")
    spec = CellSpec(model="tiny-gpt2", engine="memwise", quantize=scheme, prompt_tokens=8, new_tokens=3, runs=1,
                    warmup=0, threads=1, source=dict(name="tiny-gpt2", source="preset:tiny-gpt2", kind="preset",
                                                      weights="synthetic", config=source.config))
    record = run_cell(spec)
    assert record["status"] == "ok", record["reason"]
    assert record["quantize"] == scheme
    spec.quantize = None
    plain = run_cell(spec)
    assert plain["quantize"] is None and record["weights_bytes"] < plain["weights_bytes"]
