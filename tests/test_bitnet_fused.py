"""The fused C decode step of BitNet (memwise.models.bitnet.fused_step) against the PyTorch path.

The PyTorch path ("c-unfused": the model's modules with the C products, or "reference": plain
PyTorch) is the specification. The integer products inside the fused step are the kernel library's
and exact (test_kernels); the float work between them (RMSNorm, int8 quantization, rotary, softmax,
SiLU) runs in the C code's own order, so logits agree to rounding, not bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch

from memwise import kernels
from memwise.language_model import LanguageModel
from memwise.models import bitnet
from memwise.models.bitnet import fused_step as fused
from memwise.presets import preset_config

import reference_checks as checks

pytestmark = pytest.mark.skipif(not fused.available(), reason="the C extension with the fused step is not built")

PATHS = kernels.isa_paths() if not os.environ.get("MEMWISE_ISA") else kernels._machine_isas()

# Tolerance on logits and cached keys/values, relative to their spread. Float order differences
# (sums of squares, the softmax, exp) are ~1e-7 of the spread; an activation within an ulp of an
# int8 rounding boundary can move one step, moving its BitLinear's outputs by m / s times a ternary
# weight, well below this after a few layers. Measured on these configurations: at most ~2e-7,
# no step moved.
STEP_REL = 1e-3

CONFIGS = {
    # 2B-4T style: relu^2 GLU, grouped query attention (4 heads over 2), head_dim 16.
    "relu2-gqa": preset_config("tiny-bitnet"),
    # 1bitLLM style (Llama-shaped, silu), head_dim 24 (off the 16-lane vectors), 3 heads over one
    # key/value head, widths off the 128-weight block.
    "silu-odd": {**preset_config("bitnet-b1.58-large"), "hidden_size": 72, "intermediate_size": 200,
                 "num_hidden_layers": 3, "num_attention_heads": 3, "num_key_value_heads": 1, "vocab_size": 96},
    # 1bitLLM style with one key/value head per head.
    "silu-mha": {**preset_config("bitnet-b1.58-large"), "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 80},
}


def build(name: str, seed: int = 0) -> LanguageModel:
    """The synthetic model of CONFIGS[name] with random norm gains (synthetic weights have ones)."""
    spec = bitnet.spec_from_config(CONFIGS[name], name)
    module = bitnet.synthetic(spec, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, projection in module.ternary_layers():
            projection.norm_weight.copy_(0.5 + torch.rand(projection.norm_weight.shape, generator=gen))
        module.norm.copy_(0.5 + torch.rand(module.norm.shape, generator=gen))
    return LanguageModel(spec, module, None, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request) -> LanguageModel:
    return build(request.param)


@pytest.fixture
def fused_calls(count_calls) -> list[int]:
    """Counts FusedDecoder.step calls (the real step runs)."""
    return count_calls(fused.FusedDecoder, "step")


def prompt(vocab: int, length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_side_by_side(module, ids: torch.Tensor, steps: int, reference: str = "c-unfused") -> None:
    """The fused step (backend "auto") against the backend `reference`, token by token
    (reference_checks.decode_side_by_side)."""
    def run(fused_on: bool, *args, **kwargs) -> torch.Tensor:
        module.backend = "auto" if fused_on else reference
        with torch.inference_mode():
            return module(*args, **kwargs)
    try:
        checks.decode_side_by_side(module, ids, steps, run, STEP_REL)
    finally:
        module.backend = "auto"


def test_decode_matches_pytorch_path(model, fused_calls) -> None:
    decode_side_by_side(model.module, prompt(model.spec.vocab_size, 5, seed=1), steps=6)
    assert len(fused_calls) == 6


def test_decode_matches_plain_pytorch(model, fused_calls) -> None:
    decode_side_by_side(model.module, prompt(model.spec.vocab_size, 4, seed=2), steps=3, reference="reference")
    assert len(fused_calls) == 3


def test_decode_from_an_empty_cache(model) -> None:
    # The first token of a sequence: attention over the one slot it writes.
    decode_side_by_side(model.module, prompt(model.spec.vocab_size, 1, seed=3), steps=4)


@pytest.mark.parametrize("isa", PATHS)
def test_every_isa_path(isa: str, monkeypatch: pytest.MonkeyPatch, model, fused_calls) -> None:
    monkeypatch.setenv("MEMWISE_ISA", isa)
    decode_side_by_side(model.module, prompt(model.spec.vocab_size, 6, seed=4), steps=4)
    assert len(fused_calls) == 4


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_thread_counts(threads: int, monkeypatch: pytest.MonkeyPatch, model) -> None:
    # Threads split key/value heads in attention and weight tiles in the products; more threads than
    # key/value heads leave some without a head. The count is fixed so that other processes on the
    # machine do not change it.
    monkeypatch.setenv("MEMWISE_FIXED_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        decode_side_by_side(model.module, prompt(model.spec.vocab_size, 3, seed=5), steps=3)
    finally:
        torch.set_num_threads(previous)


def test_greedy_tokens_identical(model, fused_calls) -> None:
    ids = prompt(model.spec.vocab_size, 5, seed=6)
    out = {}
    for backend in ("auto", "c-unfused", "reference"):
        model.module.backend = backend
        out[backend] = model.generate(ids, 16, ignore_eos=True)
    model.module.backend = "auto"
    assert out["auto"].shape == (1, 5 + 16)
    assert torch.equal(out["auto"], out["c-unfused"])
    assert torch.equal(out["auto"], out["reference"])
    assert len(fused_calls) == 15       # every step after the prefill


def test_batches_and_padding_take_the_pytorch_path(model, fused_calls) -> None:
    module, vocab = model.module, model.spec.vocab_size
    ids = prompt(vocab, 4, seed=7, batch=2)
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    for rows, row_mask in ((ids, None), (ids, mask), (ids[:1], mask[:1])):    # batch 2; padded; padded batch 1
        results = {}
        for backend in ("auto", "c-unfused"):
            module.backend = backend
            cache = module.new_cache(rows.shape[0], 8)
            with torch.inference_mode():
                module(rows, cache, row_mask, last_only=True)
                step_mask = None if row_mask is None else torch.ones(rows.shape[0], 1, dtype=torch.bool)
                results[backend] = module(rows[:, -1:], cache, step_mask, last_only=True)
        assert torch.equal(results["auto"], results["c-unfused"])
    # A padding token fed at decode time to an unpadded cache.
    cache = module.new_cache(1, 8)
    module.backend = "auto"
    with torch.inference_mode():
        module(ids[:1], cache, last_only=True)
        module(ids[:1, -1:], cache, torch.tensor([[False]]), last_only=True)
    assert cache.padded
    assert fused_calls == []


def test_mirrors_match_the_extension() -> None:
    assert fused.layout_mismatches() == []


def test_decoder_follows_the_model_buffers(model) -> None:
    # .to() and friends drop the decoder, whose views point into the old buffers.
    module = model.module
    module.backend = "auto"
    with torch.inference_mode():
        module(prompt(model.spec.vocab_size, 1, seed=8), module.new_cache(1, 4))
    assert module._fused_decoder is not None
    module.float()
    assert module._fused_decoder is None
