"""Throughput mode of offloaded runs (issue 21): the block schedule (each streamed layer serves every
micro-batch before the next is read) gives the in-memory model's logits bit for bit and its greedy
tokens; generation takes the plan's resident layers and micro-batches; generate --prompts-file."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import memwise
from memwise.offload.costs import load_costs
from memwise.offload.plan import plan
from memwise.offload.stream import RegionReader, spread_resident
from tiny_models import one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
PRESET = "preset:tiny-llama"
# five prompts of different lengths: left-padded, so micro-batches carry padding too
ROWS = [[5, 17, 3, 44, 9, 60, 12, 7], [1, 8, 30], [71, 4, 19, 23, 2, 88], [6, 6, 6, 6], [300, 12, 401, 7, 9]]


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    from memwise.language_model import left_pad
    return left_pad(rows, 0)


def least_budget(source: str, directory: Path, **options) -> int:
    """The smallest budget the load accepts: one buffer, every layer streamed."""
    roomy = memwise.load(source, max_memory="64GiB", offload_dir=directory, **options)
    split = roomy.module.offload.plan
    roomy.module.layer_stream.close()
    return split.fixed + split.workspace + split.layer


def streamed_model(tmp_path: Path, **options) -> memwise.LanguageModel:
    model = memwise.load(PRESET, max_memory=least_budget(PRESET, tmp_path, **options), offload_dir=tmp_path, **options)
    assert model.module.offload.plan.resident == 0
    return model


@pytest.mark.parametrize("scheme", [None, "int8"])
@pytest.mark.parametrize("micro", [1, 2, 3])
def test_block_schedule_is_bit_identical(tmp_path, monkeypatch, scheme, micro):
    monkeypatch.setenv("MEMWISE_OFFLOAD_PLAN", "0")     # the micro-batch size set here, not planned
    reference = memwise.load(PRESET, quantize=scheme)
    model = streamed_model(tmp_path, quantize=scheme)
    model.module.micro_batch_size = micro
    ids, mask = padded(ROWS)
    chunks = [(ids[i:i + micro], mask[i:i + micro]) for i in range(0, len(ROWS), micro)]
    expected = torch.cat([reference.logits(i, m) for i, m in chunks])
    assert torch.equal(model.logits(ids, mask), expected)
    tokens = model.generate(ids, 6, mask, ignore_eos=True)
    assert torch.equal(tokens, torch.cat([reference.generate(i, 6, m, ignore_eos=True) for i, m in chunks]))
    # greedy tokens of the whole batch in memory, as one block
    assert torch.equal(tokens, reference.generate(ids, 6, mask, ignore_eos=True))


def test_one_read_of_each_layer_serves_every_micro_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMWISE_OFFLOAD_PLAN", "0")
    model = streamed_model(tmp_path)
    stream, layers = model.module.layer_stream, model.spec.num_layers
    layer = model.module.offload.plan.layer
    ids, mask = padded(ROWS)
    model.logits(ids, mask)         # row-major, micro-batches of one row would read 5 x 2 layers
    before = stream.bytes_read
    model.module.micro_batch_size = 1
    model.logits(ids, mask)
    # a pass reads each layer once; the I/O thread may have read one layer ahead of either pass
    assert layers * layer - layer <= stream.bytes_read - before <= layers * layer + layer


def test_generation_takes_the_plans_numbers(tmp_path):
    reference = memwise.load(PRESET)
    model = streamed_model(tmp_path)
    ids, mask = padded(ROWS)
    tokens = model.generate(ids, 5, mask, ignore_eos=True)
    run = model.module.offload_runtime.last
    expected = plan(PRESET, model.module.offload.plan.budget, load_costs(Path(os.environ["MEMWISE_OFFLOAD_COSTS"])),
                    batch_sizes=(len(ROWS),), prompt_tokens=ids.shape[1], new_tokens=5, kv_on_disk=False).policy
    assert run.policy == expected and run.policy.kv_placement == "memory"
    assert run.resident_layers == expected.resident_layers
    # the load streamed every layer; the plan's resident layers are now read once and kept
    assert model.module.layer_stream.resident == spread_resident(model.spec.num_layers, expected.resident_layers)
    assert run.micro_batches == expected.micro_batches
    assert model.module.micro_batch_size == (None if expected.micro_batches == 1 else len(ROWS) // expected.micro_batches)
    assert torch.equal(tokens, reference.generate(ids, 5, mask, ignore_eos=True))


def test_a_plan_that_changes_the_resident_layers_reads_only_the_difference(tmp_path, monkeypatch):
    """Plans of nearby shapes keep nearby numbers of layers resident (the sets are nested): going
    from r to r + 1 reads one layer on the computing thread, going back reads none, and the tokens
    stay those of the in-memory model."""
    from memwise.offload.runtime import RunPlan
    reference = memwise.load(PRESET)
    model = streamed_model(tmp_path)
    runtime, regions = model.module.offload_runtime, model.module.offload.header.layers
    chosen = [0]
    monkeypatch.setattr(runtime, "solve", lambda b, p, n, kv: RunPlan(b, p, n, chosen[0], None, None))
    read: list[int] = []
    real_read = RegionReader.read_into

    def recording(reader, region, buffer):
        if threading.current_thread() is threading.main_thread():
            read.append(regions.index(region))
        return real_read(reader, region, buffer)
    monkeypatch.setattr(RegionReader, "read_into", recording)
    ids, mask = padded(ROWS)
    expected = reference.generate(ids, 4, mask, ignore_eos=True)
    for resident, layers_read in ((1, spread_resident(2, 1)), (2, [i for i in range(2) if i not in spread_resident(2, 1)]),
                                  (1, []), (0, [])):
        chosen[0] = resident
        read.clear()
        assert torch.equal(model.generate(ids, 4, mask, ignore_eos=True), expected)
        assert read == layers_read and model.module.layer_stream.resident == spread_resident(2, resident)


def test_planning_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMWISE_OFFLOAD_PLAN", "0")
    model = streamed_model(tmp_path)
    model.generate(torch.tensor([[5, 6, 7]]), 2, ignore_eos=True)
    run = model.module.offload_runtime.last
    assert run.policy is None and "MEMWISE_OFFLOAD_PLAN=0" in run.reason
    assert model.module.layer_stream.resident == []


def memwise_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = "import sys; from memwise.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def test_generate_prompts_file_with_a_plan(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nThe cat sat on\nOnce upon a time\n")
    common = ("generate", PRESET, "--prompts-file", str(prompts), "--max-new-tokens", "4", "--ignore-eos")
    plain = memwise_cli(*common)
    offloaded = memwise_cli(*common, "--max-memory", "8MiB", "--offload-dir", str(tmp_path / "off"))
    assert plain.returncode == 0 and offloaded.returncode == 0, offloaded.stderr
    lines = lambda run: [line for line in run.stdout.splitlines() if not line.startswith("[")]
    assert len(lines(plain)) == 3 and [line.split("\t")[0] for line in lines(plain)] == ["0", "1", "2"]
    assert lines(offloaded) == lines(plain)
    assert "[3 prompts | 12 tokens" in offloaded.stdout
    assert "predicted" in offloaded.stderr and "measured" in offloaded.stderr and "KV cache in memory" in offloaded.stderr


@pytest.mark.parametrize("content, message", [(None, "no such file"), ("\n  \n", "no prompts"),
                                              (b"\xff\xfe", "not UTF-8")])
def test_bad_prompts_file(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    run = memwise_cli("generate", PRESET, "--prompts-file", str(path))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f"memwise: error: --prompts-file {path}: {message}"
                                               + ("" if message != "no prompts" else " (expected one prompt a line)")
                                               + ("" if message != "not UTF-8" else " text (byte 0)")]


def test_bench_cell_reports_the_plan_next_to_the_measurement(tmp_path):
    from dataclasses import asdict
    from memwise.bench.cell import CellSpec, run_cell
    from memwise.bench.sources import resolve
    spec = CellSpec(model="tiny-llama", source=asdict(resolve(PRESET)), engine="memwise", batch_size=4, prompt_tokens=8,
                    new_tokens=4, runs=1, warmup=0, max_memory="8MiB", offload_dir=str(tmp_path))
    record = run_cell(spec)
    assert record["status"] == "ok", record["reason"]
    policy = record["offload_plan"]
    assert policy["batch_size"] == 4 and policy["prompt_tokens"] == 8 and policy["new_tokens"] == 4
    assert record["predicted_tokens_per_s"] == policy["predicted_tokens_per_s"]
    assert record["measured_tokens_per_s"] == pytest.approx(4 * 4 / record["e2e_s"])
    assert record["offload_resident_layers"] == policy["resident_layers"]
