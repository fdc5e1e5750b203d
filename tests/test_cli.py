"""The memwise command as a user runs it: exit codes, one-line errors, and what it prints."""
import subprocess
import sys

import pytest


def memwise(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "memwise.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_version_and_help():
    run = memwise("--version")
    assert run.returncode == 0 and run.stdout.startswith("memwise ")
    for cmd in ("generate", "info", "convert", "bench"):
        assert memwise(cmd, "--help").returncode == 0


def test_generate_preset_prints_stats():
    run = memwise("generate", "preset:tiny-gpt2", "--prompt", "hi", "--max-new-tokens", "6", "--ignore-eos")
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("[6 tokens | TTFT") and "decode" in last and "peak RSS" in last
    assert "synthetic" in run.stderr


def test_generate_missing_source_is_one_line_error():
    run = memwise("generate", "./no/such/model", "--prompt", "hi")
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0
    assert run.stderr.startswith("memwise: error: ./no/such/model: no such directory")


def test_bad_dtype_is_one_line_error():
    run = memwise("generate", "preset:tiny-gpt2", "--prompt", "hi", "--dtype", "int3")
    assert run.returncode == 1 and "dtype 'int3' is not supported" in run.stderr
    assert "Traceback" not in run.stderr


def test_info_counts_parameters_like_transformers():
    transformers = pytest.importorskip("transformers")
    from memwise.presets import preset_config
    run = memwise("info", "preset:tiny-llama")
    assert run.returncode == 0, run.stderr
    config = preset_config("tiny-llama")
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert f"{hf.num_parameters():,}" in run.stdout
    assert "synthetic" in run.stdout
