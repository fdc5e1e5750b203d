"""memwise.load(..., quantize="int8" | "int4" | "nf4") on tiny decoder checkpoints: against the float32
model, against the same quantization done by the PyTorch reference, and its size and errors."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import memwise
from memwise.errors import MemwiseError
from memwise.kernels import int4, int8, nf4
from memwise.models import decoder
from memwise.models.decoder.quantized import (LINEARS, Int4Linear, Int8Embedding, Int8Linear, Nf4Linear,
                                              int8_weights_bytes, matrix_bytes, scheme_weights_bytes)
from tiny_models import VOCAB, one_thread, saved, tiny_configs  # noqa: F401 (fixtures)

FAMILIES = list(tiny_configs())
SCHEMES = ["int8", "int4", "nf4"]


def prompts() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_close_to_float32(saved, name):
    """int8 rounding moves each weight and activation by at most half a step (max|row| / 254), a relative
    error near 1/127/sqrt(12) ~ 0.2% per operand; through two layers of four linears, attention and the
    final norm the logits move by a few percent of their spread, far less than the gap between the
    best and second-best logit that greedy decoding follows (checked below)."""
    ids = prompts()
    full = memwise.load(saved(name)).logits(ids)
    quantized = memwise.load(saved(name), quantize="int8").logits(ids)
    spread = float(full.std())
    assert float((quantized - full).abs().mean()) < 0.03 * spread
    assert float((quantized - full).abs().max()) < 0.3 * spread


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_equal_float32(saved, name):
    """12 greedy tokens agree with the float32 model's, or they agree up to a near-tie of the float
    model: a step whose best two logits are closer than twice the largest logit change int8 causes
    there. Random tiny models have such steps (llama's third token here leads by 0.015 with changes up
    to 0.037; llama3's and llama-linear's later); gpt2, opt, phi and mistral agree on all 12."""
    prompt, new = prompts()[:1, :5], 12
    full_model, quantized_model = memwise.load(saved(name)), memwise.load(saved(name), quantize="int8")
    full = full_model.generate(prompt, max_new_tokens=new, ignore_eos=True)[0, prompt.shape[1]:]
    quantized = quantized_model.generate(prompt, max_new_tokens=new, ignore_eos=True)[0, prompt.shape[1]:]
    differ = (full != quantized).nonzero()
    if name in ("gpt2", "opt", "phi", "mistral"):
        assert len(differ) == 0
    if len(differ) == 0:
        return
    step = int(differ[0])
    assert step >= 2
    before = torch.cat([prompt[0], full[:step]])[None]
    logits_f, logits_q = full_model.logits(before)[0, -1], quantized_model.logits(before)[0, -1]
    best = logits_f.topk(2).values
    assert float(best[0] - best[1]) <= 2 * float((logits_q - logits_f).abs().max())


@pytest.mark.parametrize("name", FAMILIES)
def test_argmax_equal_wherever_the_float_model_is_not_near_a_tie(saved, name):
    """At every position of a batch: where the float model's best logit leads the second by more than
    twice the largest logit change int8 caused anywhere, the quantized model must pick the same token."""
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(11))
    full = memwise.load(saved(name)).logits(ids)
    quantized = memwise.load(saved(name), quantize="int8").logits(ids)
    top2 = full.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * float((quantized - full).abs().max())
    assert int(clear.sum()) > 0
    assert torch.equal(quantized.argmax(-1)[clear], full.argmax(-1)[clear])


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_c_kernels_match_the_reference_quantization(saved, name, monkeypatch):
    """The same quantized weights run through the PyTorch reference: equal up to float rounding."""
    model = memwise.load(saved(name), quantize="int8")
    ids = prompts()
    with_c = model.logits(ids)
    monkeypatch.setattr(int8, "_c", None)
    torch.testing.assert_close(model.logits(ids), with_c, rtol=1e-4, atol=1e-4 * float(with_c.std()))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", FAMILIES)
def test_weights_bytes_is_the_documented_size(saved, name, scheme):
    model = memwise.load(saved(name), quantize=scheme)
    linears = {n: m for n, m in model.module.named_modules() if isinstance(m, tuple(LINEARS.values()))}
    assert len(linears) == 4 * model.spec.num_layers + 2     # and the lm_head and the token embedding
    assert isinstance(model.module.lm_head, Int8Linear)      # int8 under every scheme
    assert isinstance(model.module.embed, Int8Embedding)
    assert all(isinstance(m, LINEARS[scheme]) for n, m in linears.items() if n not in ("lm_head", "embed"))
    assert not any(isinstance(m, torch.nn.Linear) for layer in model.module.layers for m in layer.modules())
    if model.spec.tie_word_embeddings:      # one int8 table serves both
        del linears["lm_head"]
    expected = sum(matrix_bytes("int8" if n in ("lm_head", "embed") else scheme, m.out_features, m.in_features)
                   + (4 * m.out_features if m.bias is not None else 0) for n, m in linears.items())
    others = [p for n, p in model.module.named_parameters() if not any(n == f"{ln}.bias" for ln in linears)]
    expected += sum(p.numel() * 4 for p in others)
    assert model.weights_bytes() == expected == scheme_weights_bytes(model.spec, scheme, torch.float32)
    if scheme == "int8":
        assert expected == int8_weights_bytes(model.spec, torch.float32)
    assert model.weights_bytes() < memwise.load(saved(name)).weights_bytes()


@pytest.mark.parametrize("name", FAMILIES)
def test_four_bit_logits_near_float32(saved, name):
    """4-bit rounding moves each weight by up to half of a 1/15 step of its group's range (int4) or
    of the NF4 gap times the block absmax (nf4): on these tiny random models the logits move by 3-18% of
    their spread on average (llama-like models, whose SwiGLU multiplies two rounded projections, the
    most), against 1-2% for int8, and stay strongly correlated with the float model's."""
    ids = prompts()
    full = memwise.load(saved(name)).logits(ids)
    for scheme in ("int4", "nf4"):
        quantized = memwise.load(saved(name), quantize=scheme).logits(ids)
        spread = float(full.std())
        assert float((quantized - full).abs().mean()) < 0.3 * spread, scheme
        assert float(torch.corrcoef(torch.stack([quantized.flatten(), full.flatten()]))[0, 1]) > 0.95, scheme
        # the most likely token of 96 positions: 68-95% the float model's (near-flat random models)
        wide = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(11))
        agree = memwise.load(saved(name), quantize=scheme).logits(wide).argmax(-1) == \
            memwise.load(saved(name)).logits(wide).argmax(-1)
        assert float(agree.float().mean()) >= 0.6, scheme


@pytest.mark.parametrize("name", ["gpt2", "opt-post", "llama3", "mistral"])
def test_int4_c_path_equals_the_reference_and_greedy_tokens_agree(saved, name, monkeypatch):
    """int4's C path computes the reference's float operations in the reference's order: the logits are
    equal, and so are 10 greedy tokens."""
    model = memwise.load(saved(name), quantize="int4")
    ids, prompt = prompts(), prompts()[:1, :5]
    with_c = model.logits(ids)
    tokens_c = model.generate(prompt, max_new_tokens=10, ignore_eos=True)
    monkeypatch.setattr(int4, "_c", None)     # the int8 lm_head stays on its C path in both runs
    assert torch.equal(model.logits(ids), with_c)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, ignore_eos=True), tokens_c)


@pytest.mark.parametrize("name", ["gpt2", "opt-post", "llama3", "mistral"])
def test_nf4_c_path_matches_the_reference_and_greedy_tokens_agree(saved, name, monkeypatch):
    """nf4's sums differ from the reference's by float rounding only; the int8 lm_head behind them can
    turn that into one int8 step of an activation that sits on a rounding boundary (seen: 92 of 2304
    logits of one position moved by 0.8% of the spread), so the bound is on the mean, and the max is
    that of one such step."""
    model = memwise.load(saved(name), quantize="nf4")
    ids, prompt = prompts(), prompts()[:1, :5]
    with_c = model.logits(ids)
    tokens_c = model.generate(prompt, max_new_tokens=10, ignore_eos=True)
    monkeypatch.setattr(nf4, "_c", None)
    difference, spread = (model.logits(ids) - with_c).abs(), float(with_c.std())
    assert float(difference.mean()) < 1e-3 * spread and float(difference.max()) < 0.03 * spread
    assert torch.equal(model.generate(prompt, max_new_tokens=10, ignore_eos=True), tokens_c)


def test_nf4_fused_matrix_is_quantized_whole(saved):
    """llama's q, k and v arrive as three tensors of one fused matrix: it is quantized once, whole."""
    model = memwise.load(saved("llama"), quantize="nf4")
    qkv = model.module.layers[0].attn.qkv
    assert isinstance(qkv, Nf4Linear) and qkv._staged is None
    float_model = memwise.load(saved("llama"))
    whole = nf4.Nf4Matrix.from_float(float_model.module.layers[0].attn.qkv.weight)
    assert torch.equal(qkv.codes, whole.codes) and torch.equal(qkv.qabs, whole.qabs)
    assert torch.equal(qkv.offset.reshape(()), whole.offset.reshape(()))


def test_bfloat16_rest_and_synthetic_preset():
    model = memwise.load("preset:tiny-gpt2", dtype="bfloat16", quantize="int8")
    assert model.module.positions.weight.dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    assert model.module.embed(torch.tensor([[1, 2]])).dtype == torch.bfloat16    # int8 rows, bfloat16 out
    assert model.weights_bytes() == int8_weights_bytes(model.spec, torch.bfloat16)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, ignore_eos=True)
    assert out.shape == (1, 6)


def test_unknown_scheme_and_ternary_models_are_one_clear_error(saved):
    with pytest.raises(MemwiseError, match=r"unknown quantization scheme 'int3' \(known: int8, int4, nf4\)"):
        memwise.load(saved("gpt2"), quantize="int3")
    for scheme in SCHEMES:
        with pytest.raises(MemwiseError, match="hgrn_bit models are already ternary"):
            memwise.load("preset:tiny-mmfree", quantize=scheme)


def test_quantize_none_is_unchanged(saved):
    model = memwise.load(saved("llama"), quantize=None)
    assert not any(isinstance(m, (Int8Linear, Int4Linear, Nf4Linear)) for m in model.module.modules())
    spec = model.spec
    assert model.weights_bytes() == decoder.weight_sizes(spec)["float32"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_int8_on_cuda_is_one_clear_error(saved):
    with pytest.raises(MemwiseError, match="runs on the CPU for now"):
        memwise.load(saved("gpt2"), quantize="int8", device="cuda")


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_linear_kernel_follows_new_tensors(cls):
    """The module keeps its kernel (checked pointers) between calls; a new weight tensor, a new bias or a
    copy of the module (.to, which may move storage) gets a new kernel, not the old pointers."""
    g = torch.Generator().manual_seed(3)
    linear = cls(96, 40, bias=True)
    linear.fill_rows(0, torch.randn(40, 96, generator=g))
    linear.bias.data.copy_(torch.randn(40, generator=g))
    x = torch.randn(2, 96, generator=g)
    reference = int8.int8_linear if cls is Int8Linear else int4.int4_linear
    assert torch.equal(linear(x), reference(x, linear.matrix(), linear.bias))
    other = cls(96, 40, bias=True)
    other.fill_rows(0, torch.randn(40, 96, generator=g))
    for name, tensor in other.named_buffers():
        setattr(linear, name, tensor.clone())
    linear.bias = torch.nn.Parameter(torch.randn(40, generator=g))
    assert torch.equal(linear(x), reference(x, other.matrix(), linear.bias))
    moved = linear.to(torch.float32)
    assert torch.equal(moved(x), reference(x, moved.matrix(), moved.bias))
    if cls is Int4Linear:     # a dtype move leaves the float16 group constants as they are
        before = moved.params.clone()
        assert moved.to(torch.bfloat16).params.dtype == torch.float16 and torch.equal(moved.params, before)


def test_int4_weight_beyond_float16_is_one_error_naming_the_tensor(saved, tmp_path):
    """int4's group constants are float16: a group reaching below -65504 cannot be held, and the
    load says which checkpoint tensor and row."""
    directory = tmp_path / "big"
    shutil.copytree(saved("opt"), directory)
    tensors = load_file(directory / "model.safetensors")
    name = next(n for n in tensors if n.endswith("layers.1.fc1.weight"))
    tensors[name][3, 5] = -1e5
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MemwiseError, match=rf"tensor '{name}': int4: weight row 3, columns 0..31: weights from -100000 "):
        memwise.load(directory, quantize="int4")
    assert memwise.load(directory, quantize="int8").logits(prompts()).isfinite().all()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("preset", ["preset:tiny-gpt2", "preset:tiny-llama"])
def test_quantized_mlp_in_token_chunks_gives_the_same_logits(monkeypatch, scheme, preset):
    import memwise
    from memwise.models.decoder import modules

    model = memwise.load(preset, quantize=scheme).module
    ids = torch.randint(0, model.spec.vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(modules, "MLP_TOKEN_CHUNK", 10**6)
    whole = model(ids)
    calls = []
    up = next(m for m in model.modules() if isinstance(m, modules.MLP)).up
    up.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-2]))
    monkeypatch.setattr(modules, "MLP_TOKEN_CHUNK", 16)
    chunked = model(ids)
    assert calls == [16, 16, 13]
    assert torch.equal(whole, chunked)
