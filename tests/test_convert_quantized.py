"""`memwise convert SOURCE OUT --quantize SCHEME` on tiny decoder checkpoints: the quantized checkpoint
loads to logits bit-identical to quantizing at load, and bad metadata is one clear line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import memwise
from memwise.cli import main
from memwise.convert import convert
from memwise.errors import MemwiseError, UnsupportedError
from memwise.models.decoder.quantized_checkpoint import CONFIG_KEY, FORMAT_VERSION
from tiny_models import VOCAB, build, one_thread  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = tmp_path_factory.mktemp(name)
            build(name, built[name])
        return built[name]
    return get


def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name,scheme", [("gpt2", "int8"), ("llama", "int4"), ("llama3", "nf4"), ("opt-post", "int4"),
                                         ("phi", "nf4"), ("mistral", "int8")])
def test_converted_logits_are_bit_identical(sources, tmp_path, name, scheme):
    out = convert(str(sources(name)), tmp_path / "q", quantize=scheme)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"memwise.scheme": scheme, "memwise.format_version": str(FORMAT_VERSION)}
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY] == {"scheme": scheme, "format_version": FORMAT_VERSION}
    stored = memwise.load(str(out))
    at_load = memwise.load(str(sources(name)), quantize=scheme)
    assert stored.weights_bytes() == at_load.weights_bytes()
    assert torch.equal(stored.logits(ids()), at_load.logits(ids()))
    assert torch.equal(stored.generate(ids(), 5), at_load.generate(ids(), 5))
    # the same scheme named again is fine; another one is refused
    memwise.load(str(out), quantize=scheme)
    other = "int8" if scheme != "int8" else "int4"
    with pytest.raises(UnsupportedError, match=f"quantized as {scheme} cannot load as quantize='{other}'"):
        memwise.load(str(out), quantize=other)


def test_cli_convert_and_bad_metadata(sources, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["convert", str(sources("gpt2")), str(out), "--quantize", "int4"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())

    config[CONFIG_KEY]["format_version"] = FORMAT_VERSION + 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(MemwiseError, match=f"format version {FORMAT_VERSION + 1} is newer than this memwise reads"):
        memwise.load(str(out))

    config[CONFIG_KEY]["format_version"] = 1    # version 1 kept the embedding in float32
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(MemwiseError, match="format version 1 keeps a float32 embedding.*convert the source again"):
        memwise.load(str(out))

    del config[CONFIG_KEY]      # the config's entry is missing, the weights say they are quantized
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(MemwiseError, match="no 'memwise_quantization' entry.*missing its metadata"):
        memwise.load(str(out))

    config[CONFIG_KEY] = {"scheme": "int4", "format_version": FORMAT_VERSION}    # the weights' metadata is missing
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(out / "model.safetensors"))
    save_file(tensors, str(out / "model.safetensors"))
    assert main(["generate", str(out), "--prompt", "hi", "--max-new-tokens", "2", "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights' metadata" in err[0] and "is missing or does not match" in err[0]


def _relabel(out, version: int) -> None:
    """Mark a converted checkpoint as format `version`, in its config and its weights' header."""
    config = json.loads((out / "config.json").read_text())
    config[CONFIG_KEY]["format_version"] = version
    (out / "config.json").write_text(json.dumps(config))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata = {**f.metadata(), "memwise.format_version": str(version)}
    save_file(load_file(str(out / "model.safetensors")), str(out / "model.safetensors"), metadata=metadata)


def test_version_2_int4_is_refused_and_version_2_int8_still_reads(sources, tmp_path, capsys):
    """Version 3 changed only int4 (float16 group constants): an int4 checkpoint of version 2 holds
    float32 ones and is one line asking to convert again; int8's and nf4's layouts are unchanged."""
    int4_out = convert(str(sources("gpt2")), tmp_path / "q4", quantize="int4")
    _relabel(int4_out, 2)
    assert main(["generate", str(int4_out), "--prompt", "hi", "--max-new-tokens", "2", "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "format version 2 keeps int4's group constants in float32" in err[0]
    assert "convert the source again" in err[0]
    int8_out = convert(str(sources("gpt2")), tmp_path / "q8", quantize="int8")
    _relabel(int8_out, 2)
    at_load = memwise.load(str(sources("gpt2")), quantize="int8")
    assert torch.equal(memwise.load(str(int8_out)).logits(ids()), at_load.logits(ids()))


def test_convert_quantize_bad_input(sources, tmp_path):
    with pytest.raises(MemwiseError, match="unknown quantization scheme 'int3'"):
        convert(str(sources("gpt2")), tmp_path / "a", quantize="int3")
    assert not (tmp_path / "a").exists()
    convert(str(sources("gpt2")), tmp_path / "b", quantize="int8")
    with pytest.raises(UnsupportedError, match="quantized already"):
        convert(str(tmp_path / "b"), tmp_path / "c", quantize="int8")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.partial-*"))
