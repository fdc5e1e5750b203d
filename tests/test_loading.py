"""Loading: sources, checkpoint layouts and every bad-input case, each with the message it must give."""
import json
import os
import subprocess
import sys

import pytest
import torch

import memwise
from memwise.checkpoint import CheckpointReader
from memwise.errors import CheckpointError, ConfigError, SourceError, UnsupportedError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_local_dir(gpt2_dir):
    model = memwise.load(gpt2_dir)
    assert model.spec.model_type == "gpt2" and not model.synthetic
    logits = model.logits(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 100) and logits.dtype == torch.float32


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        memwise.load(tmp_path)


def test_malformed_config(gpt2_dir, tmp_path):
    d = copy_dir(gpt2_dir, tmp_path / "m")
    (d / "config.json").write_text('{"model_type": "gpt2",')
    with pytest.raises(ConfigError, match=r"config.json: malformed JSON at line 1"):
        memwise.load(d)


def test_unknown_model_type_lists_supported(gpt2_dir, tmp_path):
    d = copy_dir(gpt2_dir, tmp_path / "u")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=r"'bert' is not supported \(supported: bitnet, gpt2, hgrn_bit, llama"):
        memwise.load(d)


def test_missing_tensor(gpt2_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = copy_dir(gpt2_dir, tmp_path / "missing")
    tensors = load_file(d / "model.safetensors")
    name = next(n for n in tensors if n.endswith("h.1.mlp.c_fc.weight"))
    del tensors[name]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight"):
        memwise.load(d)


def test_wrong_shape_names_tensor_expected_and_found(gpt2_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = copy_dir(gpt2_dir, tmp_path / "shape")
    tensors = load_file(d / "model.safetensors")
    name = next(n for n in tensors if n.endswith("h.0.attn.c_proj.weight"))
    tensors[name] = torch.zeros(32, 31)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_proj\.weight' has shape \[32, 31\], expected \[32, 32\]"):
        memwise.load(d)


def test_truncated_safetensors(gpt2_dir, tmp_path):
    d = copy_dir(gpt2_dir, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        memwise.load(d)


def test_corrupt_safetensors_header(gpt2_dir, tmp_path):
    d = copy_dir(gpt2_dir, tmp_path / "corrupt")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:20] = b"\xff" * 12
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        memwise.load(d)


def test_garbage_file_is_not_a_checkpoint(gpt2_dir, tmp_path):
    d = copy_dir(gpt2_dir, tmp_path / "garbage")
    (d / "model.safetensors").write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        memwise.load(d)


def test_no_weights(gpt2_dir, tmp_path):
    d = copy_dir(gpt2_dir, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        memwise.load(d)


def test_corrupt_pytorch_bin(gpt2_dir, tmp_path):
    d = copy_dir(gpt2_dir, tmp_path / "bin")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read PyTorch checkpoint"):
        memwise.load(d)


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp8"])
def test_unsupported_dtype(gpt2_dir, dtype):
    with pytest.raises(UnsupportedError, match=f"dtype '{dtype}' is not supported"):
        memwise.load(gpt2_dir, dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_unavailable(gpt2_dir):
    with pytest.raises(UnsupportedError, match="CUDA is not available"):
        memwise.load(gpt2_dir, device="cuda")


@pytest.mark.parametrize("device", ["tpu", "mps"])
def test_unsupported_device(gpt2_dir, device):
    with pytest.raises(UnsupportedError, match=f"device '{device}'"):
        memwise.load(gpt2_dir, device=device)


def test_bfloat16_load(gpt2_dir):
    model = memwise.load(gpt2_dir, dtype="bfloat16")
    ref = memwise.load(gpt2_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert (model.logits(ids) - ref.logits(ids)).abs().max() < 0.1


def test_unknown_preset():
    with pytest.raises(SourceError, match="unknown preset 'nope'"):
        memwise.load("preset:nope")


def test_missing_local_path():
    with pytest.raises(SourceError, match="no such directory"):
        memwise.load("./definitely/not/here")


def test_reader_reads_exact_bytes(tmp_path):
    from safetensors.torch import save_file
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, 2, dtype=torch.float16), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"k": "v"})
    reader = CheckpointReader(tmp_path)
    assert reader.metadata == {"k": "v"}
    for name, t in tensors.items():
        got = reader.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t)


HUB_SCRIPT = """
import sys, memwise
from memwise.errors import SourceError
try:
    model = memwise.load(sys.argv[1])
except SourceError as e:
    print("SourceError:", e); sys.exit(3)
print("loaded", model.spec.model_type, model.spec.num_layers)
"""


def hub_env(cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}


def test_hub_id_offline_and_not_cached(tmp_path):
    run = subprocess.run([sys.executable, "-c", HUB_SCRIPT, "someorg/not-cached-model"],
                         capture_output=True, text=True, env=hub_env(tmp_path))
    assert run.returncode == 3, run.stderr
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in run.stdout
    assert "huggingface-cli download someorg/not-cached-model" in run.stdout


def test_hub_id_offline_from_cache(gpt2_dir, tmp_path):
    # The hub cache's own layout: refs/main names a snapshot folder that holds the files.
    repo = tmp_path / "models--someorg--tiny-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    copy_dir(gpt2_dir, repo / "snapshots" / commit)
    run = subprocess.run([sys.executable, "-c", HUB_SCRIPT, "someorg/tiny-gpt2"],
                         capture_output=True, text=True, env=hub_env(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "loaded gpt2 2" in run.stdout
