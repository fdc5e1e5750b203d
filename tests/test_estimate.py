"""memwise.estimate and `memwise estimate`: the breakdown, its formulas against the models' own figures,
the CLI's JSON contract and errors, the memory gate of generate and bench, and predictions in bench records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import memwise
from memwise import memory_gate
from memwise.bench import cli as bench_cli
from memwise.cli import main
from memwise.errors import MemwiseError
from memwise.estimate import Estimate, estimate, estimate_inference
from memwise.estimate.cli import parse_bytes
from memwise.estimate.inference import spec_cache_bytes
from memwise.source import resolve_model


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_breakdown_sums_and_per_device_wins():
    parts = {"weights": 1000, "kv_cache": 24, "activations": 7}
    est = Estimate("inference", {"model": "m"}, parts)
    assert est.predicted_peak_bytes == 1031
    data = est.to_json()
    assert data["predicted_peak_bytes"] == 1031 and data["breakdown"] == parts and data["task"] == "inference"
    assert Estimate("finetune", {}, parts, per_device=500).predicted_peak_bytes == 500


def test_inference_parts_add_up_to_the_peak():
    est = estimate("preset:gpt2-medium", batch_size=2, prompt_tokens=64, new_tokens=32)
    assert est.predicted_peak_bytes == sum(est.parts.values())
    assert set(est.parts) >= {"framework_baseline", "weights", "kv_cache", "activations"}
    # the weights are the family's own figure
    resolved = resolve_model("preset:gpt2-medium")
    assert est.parts["weights"] == memory_gate.weights_bytes(resolved.family, resolved.spec, torch.float32)


@pytest.mark.parametrize("preset", ["preset:tiny-gpt2", "preset:tiny-llama", "preset:tiny-mmfree"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_spec_cache_formula_equals_the_models_cache_bytes(preset, dtype):
    if preset == "preset:tiny-mmfree" and dtype != "float32":
        with pytest.raises(MemwiseError, match="hgrn_bit computes in float32"):
            estimate_inference(preset, dtype=dtype)
        return
    model = memwise.load(preset, dtype=dtype)
    for batch, length in ((1, 1), (3, 17), (8, 200)):
        expected = model.module.cache_bytes(batch, length)
        assert spec_cache_bytes(model.spec, batch, length, model.dtype) == expected, (batch, length)
        part = "state" if model.spec.model_type == "hgrn_bit" else "kv_cache"
        est = estimate_inference(preset, batch_size=batch, prompt_tokens=length - length // 2,
                                 new_tokens=max(length // 2, 1), dtype=dtype)
        assert est.parts[part] == model.module.cache_bytes(batch, est.settings["prompt_tokens"]
                                                           + est.settings["new_tokens"])


def test_doubling_the_batch_grows_the_cache_as_cache_bytes_does():
    model = memwise.load("preset:tiny-llama")
    one = estimate_inference("preset:tiny-llama", batch_size=2, prompt_tokens=40, new_tokens=24)
    two = estimate_inference("preset:tiny-llama", batch_size=4, prompt_tokens=40, new_tokens=24)
    assert two.parts["kv_cache"] - one.parts["kv_cache"] == model.module.cache_bytes(4, 64) - model.module.cache_bytes(2, 64)
    assert two.parts["weights"] == one.parts["weights"]
    # a recurrent state does not grow with the tokens
    short = estimate_inference("preset:mmfree-370m", prompt_tokens=8, new_tokens=8)
    long = estimate_inference("preset:mmfree-370m", prompt_tokens=8, new_tokens=4000)
    assert short.parts["state"] == long.parts["state"]


def test_quantized_and_packed_weights_are_smaller():
    dense = estimate_inference("preset:opt-350m")
    int8 = estimate_inference("preset:opt-350m", quantize="int8")
    assert int8.parts["weights"] < dense.parts["weights"] / 2
    packed = estimate_inference("preset:mmfree-370m")
    assert packed.parts["weights"] < 0.15 * 370e6 * 4      # packed ternary codes


def test_cuda_leaves_out_the_interpreter():
    cpu = estimate_inference("preset:gpt2-medium")
    cuda = estimate_inference("preset:gpt2-medium", device="cuda")
    assert "framework_baseline" in cpu.parts and "framework_baseline" not in cuda.parts
    host_only = cpu.parts["framework_baseline"] + cpu.parts["workspace"]
    assert cpu.predicted_peak_bytes - cuda.predicted_peak_bytes == host_only
    assert cuda.parts["weights"] == cpu.parts["weights"] and cuda.parts["kv_cache"] == cpu.parts["kv_cache"]


def test_cli_json_contract(capsys):
    status, out, err = run_cli(capsys, "estimate", "preset:opt-350m", "--task", "inference", "--batch-size", "2",
                               "--prompt-tokens", "32", "--new-tokens", "16", "--dtype", "bfloat16",
                               "--engine", "transformers", "--device", "cpu", "--json")
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["predicted_peak_bytes"] == sum(data["breakdown"].values()) > 0
    expected = estimate_inference("preset:opt-350m", batch_size=2, prompt_tokens=32, new_tokens=16,
                                  dtype="bfloat16", engine="transformers")
    assert data["predicted_peak_bytes"] == expected.predicted_peak_bytes
    assert data["settings"]["engine"] == "transformers" and data["settings"]["batch_size"] == 2


def test_cli_table_and_budget(capsys):
    status, out, _ = run_cli(capsys, "estimate", "preset:tiny-gpt2")
    assert status == 0 and "predicted peak" in out and "kv_cache" in out
    budget = estimate_inference("preset:opt-350m", dtype="bfloat16").predicted_peak_bytes + 1
    status, out, _ = run_cli(capsys, "estimate", "preset:opt-350m", "--budget", str(budget), "--json")
    assert status == 0
    fits = json.loads(out)["fits"]
    assert {"dtype": "bfloat16", "quantize": None, "batch_size": 1} in [
        {k: r[k] for k in ("dtype", "quantize", "batch_size")} for r in fits]
    assert all(r["predicted_peak_bytes"] <= budget for r in fits)
    assert not any(r["dtype"] == "float32" and r["quantize"] is None for r in fits)   # 1.4 GB of weights alone
    per_token = [r["bytes_read_per_step"] / r["batch_size"] for r in fits]
    assert per_token == sorted(per_token)
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes("512M") == 2**29


@pytest.mark.parametrize("args, words", [
    (["--engine", "vllm"], "unknown engine 'vllm'"),
    (["--budget", "two gigs"], "--budget 'two gigs': not an amount of memory"),
    (["--budget", "0GiB"], "at least one byte"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--quantize", "int3"], "unknown quantization scheme"),
])
def test_bad_input_is_one_line(capsys, args, words):
    status, out, err = run_cli(capsys, "estimate", "preset:tiny-gpt2", *args)
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("flag", ["--batch-size", "--prompt-tokens", "--new-tokens"])
def test_bad_numbers_are_one_line(capsys, flag):
    for value in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as stop:
            main(["estimate", "preset:tiny-gpt2", flag, value])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err
    with pytest.raises(MemwiseError, match="batch_size should be a positive integer"):
        estimate_inference("preset:tiny-gpt2", batch_size=0)


@pytest.mark.parametrize("args, words", [
    (["--task", "finetune", "--devices", "2", "--strategy", "zero4"], "unknown parallel strategy 'zero4'"),
    (["--task", "finetune", "--devices", "3", "--strategy", "tp"], "heads (4, 4 key/value) divisible by 3"),
    (["--task", "finetune", "--devices", "4", "--strategy", "tp3xdp2"], "tp x dp = 6 should equal devices = 4"),
    (["--task", "inference", "--devices", "2", "--strategy", "tp"], "an inference estimate is for one device"),
])
def test_bad_parallel_input_is_one_line(capsys, args, words):
    status, out, err = run_cli(capsys, "estimate", "preset:tiny-gpt2", *args)
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_cli_takes_tp_x_dp_combinations(capsys):
    status, out, _ = run_cli(capsys, "estimate", "preset:tiny-gpt2", "--task", "finetune", "--devices", "4",
                             "--strategy", "tp2xdp2", "--json")
    record = json.loads(out)
    assert status == 0 and record["settings"]["strategy"] == "tp2xdp2" and record["predicted_peak_bytes"] > 0


def test_model_whose_config_lacks_sizes(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "vocab_size": 9}))
    status, out, err = run_cli(capsys, "estimate", str(tmp_path), "--json")
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "config.json" in err and "hidden_size" in err, err


def test_engine_family_mismatch_and_finetune_pass_through(capsys):
    status, _, err = run_cli(capsys, "estimate", "preset:tiny-mmfree", "--engine", "transformers")
    assert status == 1 and "cannot run hgrn_bit" in err
    status, _, err = run_cli(capsys, "estimate", "preset:tiny-gpt2", "--engine", "memwise-reference")
    assert status == 1 and "hgrn_bit" in err and len(err.strip().splitlines()) == 1
    packed = estimate_inference("preset:mmfree-370m")
    unpacked = estimate_inference("preset:mmfree-370m", engine="memwise-reference")
    assert unpacked.predicted_peak_bytes - packed.predicted_peak_bytes == unpacked.parts["unpacked_matrices"] > 0
    status, out, err = run_cli(capsys, "estimate", "preset:tiny-gpt2", "--task", "finetune", "--method", "lora",
                               "--seq-len", "64", "--json")
    from memwise.estimate.finetune import estimate_finetune
    from memwise.source import resolve_model

    want = estimate_finetune(resolve_model("preset:tiny-gpt2").spec, method="lora", seq_len=64)
    assert status == 0 and json.loads(out)["task"] == "finetune"
    assert json.loads(out)["predicted_peak_bytes"] == want.predicted_peak_bytes


@pytest.fixture
def tiny_memory(monkeypatch):
    """The probe says one MiB is available: the gate is what is under test, not the probe."""
    monkeypatch.delenv("MEMWISE_NO_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(memory_gate, "available_bytes", lambda device: 2**20)


def test_generate_gate_refuses_and_force_passes(capsys, tiny_memory, monkeypatch):
    status, out, err = run_cli(capsys, "generate", "preset:gpt2-medium", "--prompt", "hi", "--max-new-tokens", "4")
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "predicted peak" in err and "--force" in err, err
    status, out, err = run_cli(capsys, "generate", "preset:tiny-gpt2", "--prompt", "hi", "--max-new-tokens", "3",
                               "--force")
    assert status == 0, err
    assert "3 tokens" in out
    monkeypatch.setenv("MEMWISE_NO_MEMORY_CHECK", "1")    # still turns every check off
    status, out, err = run_cli(capsys, "generate", "preset:tiny-gpt2", "--prompt", "hi", "--max-new-tokens", "2")
    assert status == 0, err


def test_bench_gate_refuses_before_any_cell(capsys, tiny_memory, tmp_path):
    out_dir = tmp_path / "out"
    status = bench_cli.main(["--model", "preset:tiny-gpt2", "--engine", "memwise", "--runs", "1", "--warmup", "0",
                             "--prompt-tokens", "4", "--new-tokens", "2", "--out", str(out_dir)])
    err = capsys.readouterr().err
    assert status == 1
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "predicted peak" in lines[0] and "tiny-gpt2" in lines[0], err
    assert not (out_dir / "results.json").exists()


def test_bench_records_carry_predictions(capsys, tiny_memory, tmp_path):
    """Real cells (fresh processes, which see the real memory) run with --force past the faked probe."""
    out_dir = tmp_path / "out"
    status = bench_cli.main(["--model", "preset:tiny-gpt2", "--model", "preset:tiny-mmfree", "--engine", "memwise",
                             "--runs", "1", "--warmup", "0", "--prompt-tokens", "8", "--new-tokens", "4",
                             "--threads", "1", "--out", str(out_dir), "--force"])
    assert status == 0, capsys.readouterr().err
    records = json.loads((out_dir / "results.json").read_text())["results"]
    assert [r["status"] for r in records] == ["ok", "ok"]
    for record in records:
        expected = estimate_inference(f"preset:{record['model']}", prompt_tokens=8, new_tokens=4)
        assert record["predicted_peak_bytes"] == expected.predicted_peak_bytes
        measured = max(record["peak_rss_bytes"], record["load_peak_rss_bytes"])
        assert abs(record["predicted_peak_bytes"] / measured - 1) < 0.25
    table = (out_dir / "results.md").read_text()
    assert "Predicted error" in table and "%" in table


def test_real_checkpoint_adds_what_the_engine_maps(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert size > 0
    mapped = estimate_inference(str(tmp_path), engine="transformers", prompt_tokens=8, new_tokens=4)
    assert mapped.parts["checkpoint_mapped"] == size and mapped.notes
    streamed = estimate_inference(str(tmp_path), prompt_tokens=8, new_tokens=4)   # memwise reads with pread
    assert "checkpoint_mapped" not in streamed.parts
    assert streamed.predicted_peak_bytes == sum(streamed.parts.values())


def test_preset_name_without_a_cached_checkpoint_uses_the_presets_config(capsys, monkeypatch, tmp_path):
    # an empty hub cache and no network: the name falls back to the preset, as `memwise bench` does
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    status, out, err = run_cli(capsys, "estimate", "bitnet-b1.58-large", "--json")
    by_name = json.loads(out)
    assert status == 0 and "preset:bitnet-b1.58-large" in err
    _, out, _ = run_cli(capsys, "estimate", "preset:bitnet-b1.58-large", "--json")
    assert by_name["predicted_peak_bytes"] == json.loads(out)["predicted_peak_bytes"]
    status, _, err = run_cli(capsys, "estimate", "no-such-org/no-such-model")   # neither: still an error
    assert status != 0 and "no-such-org/no-such-model" in err
