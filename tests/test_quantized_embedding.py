"""The int8 token embedding of quantized decoders (issue 19's memory target): its lookup, the tied
lm_head that is the same tensors, its size in the estimator, the quantized checkpoint that stores it,
the chunked quantization of the load, and the load's imports."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import memwise
from memwise.convert import convert
from memwise.estimate.inference import estimate_inference
from memwise.kernels import nf4
from memwise.kernels.int8 import quantize_weight
from memwise.models.decoder import quantized
from memwise.models.decoder.quantized import Int4Linear, Int8Embedding, Int8Linear
from tiny_models import VOCAB, one_thread, saved, tiny_configs  # noqa: F401 (fixtures)

SCHEMES = ["int8", "int4", "nf4"]
TIED = [name for name, config in tiny_configs().items() if config.tie_word_embeddings]
UNTIED = [name for name in tiny_configs() if name not in TIED]


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("name", ["gpt2", "opt-post", "llama"])
def test_lookup_equals_dequantize_then_index(saved, name):
    float_table = memwise.load(saved(name)).module.embed.weight
    embed = memwise.load(saved(name), quantize="int4").module.embed
    assert isinstance(embed, Int8Embedding)
    q, scale = quantize_weight(float_table)     # the int8 reference: symmetric per row
    assert torch.equal(embed.weight[:, :float_table.shape[1]], q) and torch.equal(embed.scale, scale)
    reference = (q.float() * scale[:, None])[token_ids()]
    looked_up = embed(token_ids())
    assert looked_up.dtype == torch.float32 and torch.equal(looked_up, reference)
    assert torch.equal(embed.dequantized()[token_ids()], reference)
    # within half an int8 step of each row's float values
    step = scale[token_ids()].unsqueeze(-1)
    assert bool(((looked_up - float_table[token_ids()]).abs() <= step / 2 + 1e-7).all())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", TIED)
def test_tied_lm_head_is_the_embeddings_tensors(saved, name, scheme):
    model = memwise.load(saved(name), quantize=scheme).module
    assert isinstance(model.lm_head, Int8Linear) and not isinstance(model.lm_head, Int8Embedding)
    for part in ("weight", "scale", "row_sums"):
        assert getattr(model.lm_head, part) is getattr(model.embed, part)
    held = {t.data_ptr() for t in model.buffers()}
    assert model.embed.weight.data_ptr() in held and len(held) == len(list(model.buffers()))
    # the head multiplies by the same int8 table the lookup reads
    x = torch.randn(1, 2, model.embed.in_features, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.lm_head(x), Int8Linear.forward(model.embed, x))


@pytest.mark.parametrize("name", UNTIED[:2])
def test_untied_lm_head_has_its_own_int8_matrix(saved, name):
    model = memwise.load(saved(name), quantize="int8").module
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("preset", ["preset:tiny-gpt2", "preset:tiny-llama"])
def test_estimator_predicts_the_int8_embedding(preset, scheme):
    model = memwise.load(preset, quantize=scheme)
    predicted = estimate_inference(preset, quantize=scheme).parts["weights"]
    assert predicted == model.weights_bytes()
    spec = model.spec
    float_table = spec.vocab_size * spec.embed_dim * 4
    assert predicted < estimate_inference(preset).parts["weights"] - float_table   # the float table is gone


@pytest.mark.parametrize("name,scheme", [("gpt2", "int8"), ("llama3", "int4"), ("llama", "nf4")])
def test_converted_checkpoint_stores_the_int8_table_once(saved, tmp_path, name, scheme):
    out = convert(str(saved(name)), tmp_path / "q", quantize=scheme)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("embed.weight").dtype == torch.int8
    assert {"embed.weight", "embed.scale", "embed.row_sums"} <= names
    assert ("lm_head.weight" in names) == (name in UNTIED)
    loaded, direct = memwise.load(str(out)), memwise.load(saved(name), quantize=scheme)
    assert torch.equal(loaded.logits(token_ids()), direct.logits(token_ids()))
    if name in TIED:
        assert loaded.module.lm_head.weight is loaded.module.embed.weight


def test_chunked_quantization_equals_one_pass(monkeypatch):
    w = torch.randn(37, 200, generator=torch.Generator().manual_seed(3))
    whole8, whole4 = Int8Linear(200, 37, False), Int4Linear(200, 37, False)
    whole8.fill_rows(0, w)
    whole4.fill_rows(0, w)
    monkeypatch.setattr(quantized, "CHUNK_WEIGHTS", 3 * 200 + 5)     # 3 rows at a time, a short last chunk
    assert list(quantized.row_chunks(37, 200))[-1] == (36, 37)
    chunked8, chunked4 = Int8Linear(200, 37, False), Int4Linear(200, 37, False)
    chunked8.fill_rows(0, w)
    chunked4.fill_rows(0, w)
    for a, b in ((whole8, chunked8), (whole4, chunked4)):
        assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers()))
    whole = nf4.quantize_weight(w)
    monkeypatch.setattr(nf4, "CHUNK_WEIGHTS", 5 * 256)       # 5 rows of 256 padded columns at a time
    assert all(torch.equal(x, y) for x, y in zip(whole, nf4.quantize_weight(w)))


def test_loading_a_decoder_imports_neither_dynamo_nor_sympy():
    """nn.Embedding's init and Module.to_empty on the meta device import torch._dynamo (with triton)
    and sympy: 184 MiB of resident set that the load no longer carries."""
    code = ("import sys, memwise; memwise.load('preset:tiny-gpt2', quantize='int8'); "
            "memwise.load('preset:tiny-llama'); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton') if m in sys.modules))")
    src = str(Path(memwise.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_offload_file_stores_the_tied_int8_table_once(saved, tmp_path):
    from memwise.offload.decoder import state_tensors
    reference = memwise.load(saved("gpt2"), quantize="int4")
    model = memwise.load(saved("gpt2"), quantize="int4", max_memory="64GiB", offload_dir=tmp_path)
    module = model.module
    assert module.lm_head.weight is module.embed.weight and module.embed.weight.dtype == torch.int8
    stored = [name for name, _ in state_tensors(module)]     # what the offload file's tensor tables hold
    assert "embed.weight" in stored and not any(name.startswith("lm_head.") for name in stored)
    assert torch.equal(model.logits(token_ids()), reference.logits(token_ids()))
