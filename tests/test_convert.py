"""memwise convert: packed checkpoints load to identical logits, re-conversion is a no-op, and a failed
conversion leaves nothing behind."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import memwise
from memwise.checkpoint import CheckpointReader
from memwise.convert import convert
from memwise.errors import CheckpointError, MemwiseError, SourceError, UnsupportedError
from memwise.kernels.packed import pack_ternary, padded_cols, quantize_latent

from hgrn_checkpoints import hgrn_config, write_hgrn_checkpoint


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    path = tmp_path_factory.mktemp("latent")
    config = hgrn_config(96, 3, 203, intermediate_size=200)
    tensors = write_hgrn_checkpoint(path, config, seed=7)
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    return path, config, tensors


@pytest.fixture(scope="module")
def packed(latent, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "packed"
    assert convert(str(latent[0]), out, progress=False) == out
    return out


def logits(path, ids):
    model = memwise.load(str(path))
    model.module.backend = "reference"
    return model.logits(ids)


def test_packed_checkpoint_gives_identical_logits(latent, packed):
    ids = torch.randint(0, 203, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(packed, ids), logits(latent[0], ids))


def test_packed_file_layout(latent, packed):
    path, config, tensors = latent
    with safe_open(str(packed / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "memwise-ternary", "format_version": "1"}
    stored = load_file(str(packed / "model.safetensors"))    # a standard safetensors file
    name = "model.layers.2.mlp.down_proj.weight"
    t, m = quantize_latent(tensors[name])
    assert stored[name + ".packed"].dtype == torch.uint8
    assert stored[name + ".packed"].shape == (96, padded_cols(200) // 4)
    assert torch.equal(stored[name + ".packed"], pack_ternary(t))
    assert stored[name + ".scale"].dtype == torch.float32 and stored[name + ".scale"].shape == ()
    assert abs(float(stored[name + ".scale"]) - m) <= 1e-6 * m
    # Everything that is not a ternary matrix is kept as stored, bytes and dtype.
    for other in ("model.embeddings.weight", "model.lower_bounds", "model.layers.0.attn.g_norm.weight",
                  "lm_head.norm.weight"):
        assert stored[other].dtype == torch.bfloat16 and torch.equal(stored[other], tensors[other])
    assert not any(n.endswith(".weight") and n + ".packed" in stored for n in stored)
    ternary = [n for n in tensors if n.endswith("_proj.weight") or n == "lm_head.weight"]
    assert len(stored) == len(tensors) + len(ternary)
    # Tensors start at multiples of their element size.
    reader = CheckpointReader(packed)
    for entry in reader.entries.values():
        assert entry.offset % entry.dtype.itemsize == 0


def test_packed_is_much_smaller(latent, packed):
    latent_bytes = (latent[0] / "model.safetensors").stat().st_size
    packed_bytes = (packed / "model.safetensors").stat().st_size
    assert packed_bytes < latent_bytes / 2


def test_config_and_tokenizer_files(latent, packed):
    config = json.loads((packed / "config.json").read_text())
    assert config["memwise"]["format"] == "memwise-ternary" and config["memwise"]["format_version"] == 1
    assert {k: v for k, v in config.items() if k != "memwise"} == latent[1]
    assert (packed / "tokenizer_config.json").read_text() == '{"bos_token": "<s>"}'
    assert sorted(p.name for p in packed.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]


def test_converting_a_converted_model_changes_nothing(packed, tmp_path):
    again = convert(str(packed), tmp_path / "again", progress=False)
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (packed / name).read_bytes(), name


def test_conventional_model_is_refused(tmp_path):
    # The model type is refused from config.json alone, before any weights are read.
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16}))
    with pytest.raises(UnsupportedError, match="convert supports hgrn_bit .* model_type 'gpt2'"):
        convert(str(tmp_path / "gpt2"), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


@pytest.mark.parametrize("broken", ["missing", "shape"])
def test_bad_source_leaves_no_output(tmp_path, broken):
    name = "lm_head.norm.weight"   # the last tensor the layout lists
    if broken == "missing":
        write_hgrn_checkpoint(tmp_path / "src", hgrn_config(64, 2, 50), drop=(name,))
    else:
        write_hgrn_checkpoint(tmp_path / "src", hgrn_config(64, 2, 50),
                              replace={name: torch.ones(65, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=name):
        convert(str(tmp_path / "src"), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failure_while_writing_leaves_no_output(tmp_path):
    """A corrupt packed source is only found while copying; the partial output is removed."""
    write_hgrn_checkpoint(tmp_path / "src", hgrn_config(64, 2, 50))
    convert(str(tmp_path / "src"), tmp_path / "packed", progress=False)
    weights = tmp_path / "packed" / "model.safetensors"
    reader = CheckpointReader(tmp_path / "packed")
    entry = reader.entries["model.layers.1.mlp.down_proj.weight.packed"]
    data = bytearray(weights.read_bytes())
    data[entry.offset] = 0xFF     # code 3: not a ternary value
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="invalid 2-bit code 3"):
        convert(str(tmp_path / "packed"), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed", "src"]


def test_existing_output_is_not_touched(latent, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(MemwiseError, match="already exists"):
        convert(str(latent[0]), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep").read_text() == "x"


def test_preset_is_refused(tmp_path):
    with pytest.raises(SourceError, match="presets have random weights"):
        convert("preset:tiny-mmfree", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert(latent, tmp_path, capsys):
    from memwise.cli import main
    out = tmp_path / "cli"
    assert main(["convert", str(latent[0]), str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["convert", str(latent[0]), str(out)]) == 1      # a user mistake: one line, exit 1
    assert "already exists" in capsys.readouterr().err
