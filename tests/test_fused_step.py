"""The fused C decode step of HGRN-Bit models (memwise.models.hgrn_bit.fused_step) against the unfused path.

The unfused paths ("c-unfused": one C BitLinear at a time plus torch ops, or "reference": plain
PyTorch) are the specification. The fused step does the same float work in its own order, so its
logits and states must agree within a tolerance relative to their spread (reference_checks), and
greedy generation must pick the same tokens; the integer products inside are exact (test_kernels).
"""
from __future__ import annotations

import copy
import ctypes
import os

import pytest
import torch

import memwise
from memwise import kernels
from memwise.kernels import KernelInputError
from memwise.models.hgrn_bit import fused_step as fused
from memwise.models import hgrn_bit
from memwise.presets import preset_config
from memwise.kernels.packed import TernaryMatrix, bitlinear_reference, ternary_matmul_reference

from hgrn_checkpoints import hgrn_config, write_hgrn_checkpoint
from reference_checks import BITLINEAR_REL, assert_close

pytestmark = pytest.mark.skipif(not fused.available(), reason="the C extension with the fused step is not built")

PATHS = kernels.isa_paths() if not os.environ.get("MEMWISE_ISA") else kernels._machine_isas()

# Logits and states of a step after a few layers of tiny random models: rounding differences move
# a few int8 activations by one step now and then, each moving its BitLinear's outputs by far less
# than this (measured on these configurations: about 1e-7 of the spread, no step moved).
STEP_REL = 1e-3

CONFIGS = {
    # Lower bounds and gains that differ per layer and channel (the checkpoint writer's defaults).
    "h64": hgrn_config(64, 3, 301),
    # Widths off the vector lengths (80 = 64 + 16, the GLU's 200 = 192 + 8), two heads (per-head
    # g norm), K off the 128-weight block.
    "h80-odd": hgrn_config(80, 3, 263, intermediate_size=200, num_heads=2),
    # Recurrence wider than the model (D = 2H), no lower bounds.
    "expand2": hgrn_config(64, 2, 128, expand_ratio=2, use_lower_bound=False),
}


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert_close(got, want, STEP_REL)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    config = CONFIGS[request.param]
    write_hgrn_checkpoint(path, config, seed=3)
    return memwise.load(str(path))


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of random lengths 1..length (the first one full length)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    mask = torch.arange(length).unsqueeze(0) >= (length - lengths).unsqueeze(1)
    return ids.masked_fill(~mask, 0), mask


def decode_side_by_side(module, ids: torch.Tensor, mask: torch.Tensor, steps: int,
                        decode_mask: torch.Tensor | None = None) -> None:
    """Prefill once, then feed the same tokens through the fused and the unfused step and compare
    logits and states at every step."""
    batch = ids.shape[0]
    module.backend = "c-unfused"
    ref_cache = module.new_cache(batch)
    with torch.inference_mode():
        logits = module(ids, ref_cache, mask, last_only=True)
        cache = module.new_cache(batch)
        cache.state.copy_(ref_cache.state)
        cache.length = ref_cache.length
        step_mask = torch.ones((batch, 1), dtype=torch.bool) if decode_mask is None else decode_mask
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            module.backend = "c-unfused"
            logits = module(token, ref_cache, step_mask, last_only=True)
            module.backend = "auto"
            got = module(token, cache, step_mask, last_only=True)
            assert module._fused_decoder is not None
            assert got.shape == logits.shape == (batch, 1, module.spec.vocab_size)
            assert_same(got, logits)
            assert_same(cache.state, ref_cache.state)
        assert cache.length == ref_cache.length


# ---- decode steps against the unfused path ----------------------------------------------------


def test_decode_matches_unfused_with_padding(model) -> None:
    spec = model.spec
    ids, mask = random_prompts(5, 6, spec.vocab_size, seed=11)
    decode_side_by_side(model.module, ids, mask, steps=6)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared")
    write_hgrn_checkpoint(path, hgrn_config(96, 2, 200, intermediate_size=136), seed=5)
    return memwise.load(str(path))


@pytest.mark.parametrize("batch", range(1, 18))
def test_every_batch_size(batch: int, shared) -> None:
    # 1 (GEMV), 2-4 (4 x 4 and smaller tiles), 5-17 (AMX where the CPU has it, from
    # memwise.kernels._c.AMX_MIN_ROWS rows on, with a partial second tile of 16 rows at 17).
    ids, mask = random_prompts(batch, 4, shared.spec.vocab_size, seed=batch)
    decode_side_by_side(shared.module, ids, mask, steps=2)


@pytest.mark.parametrize("isa", PATHS)
def test_every_isa_path(isa: str, monkeypatch: pytest.MonkeyPatch, shared) -> None:
    monkeypatch.setenv("MEMWISE_ISA", isa)
    for batch in (1, 3, 16):
        ids, mask = random_prompts(batch, 3, shared.spec.vocab_size, seed=100 + batch)
        decode_side_by_side(shared.module, ids, mask, steps=2)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_thread_counts(threads: int, shared, monkeypatch: pytest.MonkeyPatch) -> None:
    # With fewer rows than threads, threads share a row: each quantizes its part of the row and
    # the parts' sums meet after a barrier; with more, each takes whole rows.  Seven threads leave
    # thread 0 no part of a 96-wide row (parts are multiples of 16), and outnumber the cores of
    # small machines, where the step's barrier must sleep.  The count is fixed: other processes on
    # the machine must not change which split is tested.
    monkeypatch.setenv("MEMWISE_FIXED_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 2, 5):
            ids, mask = random_prompts(batch, 3, shared.spec.vocab_size, seed=200 + batch)
            decode_side_by_side(shared.module, ids, mask, steps=2)
    finally:
        torch.set_num_threads(previous)


def test_masked_decode_step(model) -> None:
    # A padded position fed during decode (mask 0) must leave that sequence's recurrence input at 0.
    ids, mask = random_prompts(3, 4, model.spec.vocab_size, seed=7)
    decode_side_by_side(model.module, ids, mask, steps=2, decode_mask=torch.tensor([[True], [False], [True]]))


def test_equals_the_pytorch_reference(model) -> None:
    module = model.module
    ids, mask = random_prompts(4, 5, model.spec.vocab_size, seed=21)
    module.backend = "reference"
    ref_cache = module.new_cache(4)
    cache = module.new_cache(4)
    with torch.inference_mode():
        module(ids, ref_cache, mask)
        cache.state.copy_(ref_cache.state)
        token = ids[:, -1:]
        want = module(token, ref_cache, torch.ones(4, 1, dtype=torch.bool))
        module.backend = "auto"
        got = module(token, cache, torch.ones(4, 1, dtype=torch.bool))
    assert_same(got, want)
    assert_same(cache.state, ref_cache.state)


def test_greedy_generation_identical(model) -> None:
    # 24 greedy steps of a padded batch: the fused, unfused and plain PyTorch paths pick the same
    # tokens, and each sequence the same as when generated alone.
    ids, mask = random_prompts(3, 5, model.spec.vocab_size, seed=31)
    out = {}
    for backend in ("auto", "c-unfused", "reference"):
        model.module.backend = backend
        out[backend] = model.generate(ids, 24, attention_mask=mask, ignore_eos=True)
    assert out["auto"].shape == (3, 5 + 24)
    assert torch.equal(out["auto"], out["c-unfused"])
    assert torch.equal(out["auto"], out["reference"])
    model.module.backend = "auto"
    for b in range(3):
        alone = model.generate(ids[b:b + 1, mask[b]], 24, ignore_eos=True)
        assert torch.equal(alone[0, -24:], out["auto"][b, -24:])


@pytest.mark.parametrize("threads", [2, 3])
def test_large_rows(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # B x D and B x I above 32768 elements: rows wider than the vector loops' and the threads'
    # parts, widths off the vector length.  Each thread's stretch of every product is several of
    # run_jobs' chunks (32 KB of codes), so threads that finish early claim the others' chunks:
    # a chunk run twice would add its residual twice, one never run would leave stale outputs.
    config = {**preset_config("tiny-mmfree"), "hidden_size": 2080, "intermediate_size": 2000,
              "num_hidden_layers": 1, "vocab_size": 64}
    spec = hgrn_bit.spec_from_config(config, "test")
    module = hgrn_bit.synthetic(spec, seed=2)
    _randomize_gains(module, seed=2)
    monkeypatch.setenv("MEMWISE_FIXED_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 17):
            ids, mask = random_prompts(batch, 2, spec.vocab_size, seed=3)
            decode_side_by_side(module, ids, mask, steps=2)
    finally:
        torch.set_num_threads(previous)


def _randomize_gains(module, seed: int) -> None:
    """Synthetic models have unit gains and zero lower bounds; perturb them in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if buf.dtype == torch.float32 and buf.dim() == 1:
                buf.copy_(1 + 0.3 * torch.randn(buf.shape, generator=gen))
        if module.lower_bounds is not None:
            raw = torch.randn(module.lower_bounds.shape, generator=gen).softmax(0)
            module.lower_bounds.copy_(raw.cumsum(0) - raw[0])


# ---- the product kernels the step shares with memwise.kernels ----------------------------------


@pytest.mark.parametrize("isa", PATHS)
def test_long_rows_exact(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # K of many blocks (up to 64 rows the AMX path unpacks a pair of blocks at a time into a ring
    # and multiplies the pairs behind it, and takes a K whose activation tiles overflow L1 in
    # chunks over groups of 8 panels), with a partial last pair and block, and panel counts that
    # leave a partial group; products exact and BitLinear close to the plain PyTorch reference.
    gen = torch.Generator().manual_seed(17)
    for m, n, k in ((1, 37, 2900), (5, 9, 1100), (12, 37, 1100), (16, 33, 2816), (16, 300, 2816),
                    (20, 150, 1500), (33, 20, 1030), (48, 140, 700), (64, 17, 2000), (65, 18, 1500)):
        t = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
        q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
        weight = TernaryMatrix.from_ternary(t, 0.03)
        assert torch.equal(kernels.ternary_matmul(q, weight, isa=isa), ternary_matmul_reference(q, t)), (m, n, k)
    x = torch.randn(16, 2816, generator=gen)
    g = 1 + 0.3 * torch.randn(2816, generator=gen)
    weight = TernaryMatrix.from_ternary(torch.randint(-1, 2, (40, 2816), dtype=torch.int8, generator=gen), 0.03)
    monkeypatch.setenv("MEMWISE_ISA", isa)
    got = kernels.bitlinear(x, g, 1e-6, weight)
    want = bitlinear_reference(x, g, 1e-6, weight)
    assert_close(got, want, BITLINEAR_REL)


# ---- plumbing -------------------------------------------------------------------------------


def test_backends_that_use_the_fused_step(model) -> None:
    module = model.module
    token = torch.tensor([[5]])
    for backend, fused_expected in (("auto", True), ("c", True), ("c-unfused", False), ("reference", False)):
        module.backend = backend
        module._fused_decoder = None
        with torch.inference_mode():
            module(token, module.new_cache(1))
            used = module._fused_decoder is not None
            module(torch.tensor([[5, 6]]), module.new_cache(1))  # prefill never fuses
        assert used == fused_expected, backend
    module.backend = "auto"


def test_far_prefetches_follow_the_cache_and_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The decoder turns far prefetches on when the weights outgrow the last-level cache.  Forced on,
    # with matrices long enough (hundreds of KB per thread) that the far prefetches land inside
    # them, the step must give the same bits.
    config = {**preset_config("tiny-mmfree"), "hidden_size": 512, "intermediate_size": 1408,
              "num_hidden_layers": 1, "vocab_size": 4000}
    module = hgrn_bit.synthetic(hgrn_bit.spec_from_config(config, "test"), seed=4)
    _randomize_gains(module, seed=4)
    monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 1 << 40)
    cached = fused.FusedDecoder(module)
    monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 1 << 20)
    streaming = fused.FusedDecoder(module)
    assert not cached.streams_from_dram and streaming.streams_from_dram
    assert cached.view.weights_from_dram == 0 and streaming.view.weights_from_dram == 1
    width = module.spec.hidden_size * module.spec.expand_ratio
    for batch in (1, 2):
        a = torch.zeros((1, batch, width))
        b = torch.zeros((1, batch, width))
        for token in (5, 9, 3):
            ids = torch.full((batch, 1), token)
            assert torch.equal(cached.step(ids, a), streaming.step(ids, b))
            assert torch.equal(a, b)


def test_decoder_dropped_when_buffers_move(model) -> None:
    module = model.module
    module.backend = "auto"
    with torch.inference_mode():
        first = module(torch.tensor([[7]]), module.new_cache(1))
        assert module._fused_decoder is not None
        module.float()
        assert module._fused_decoder is None
        again = module(torch.tensor([[7]]), module.new_cache(1))
        module(torch.tensor([[7]]), module.new_cache(1))
        twin = copy.deepcopy(module)  # the copy must not share (or fail to copy) the decoder
        assert twin._fused_decoder is None
        copied = twin(torch.tensor([[7]]), twin.new_cache(1))
        assert twin._fused_decoder is not module._fused_decoder
    assert torch.equal(first, again)
    assert torch.equal(first, copied)


def test_noncontiguous_state_falls_back(model) -> None:
    module = model.module
    module.backend = "auto"
    cache = module.new_cache(2)
    wide = torch.zeros(cache.state.shape[0], cache.state.shape[1], 2 * cache.state.shape[2])
    strided = hgrn_bit.RecurrentCache(wide[:, :, ::2])
    with torch.inference_mode():
        want = module(torch.tensor([[4], [9]]), cache)
        got = module(torch.tensor([[4], [9]]), strided)
    assert_same(got, want)
    assert_same(strided.state, cache.state)


def test_bad_step_inputs(model) -> None:
    decoder = fused.FusedDecoder(model.module)
    state = model.module.new_cache(2).state
    with pytest.raises(KernelInputError, match=r"input_ids must be \[B, 1\]"):
        decoder.step(torch.tensor([[1, 2], [3, 4]]), state)
    with pytest.raises(KernelInputError, match="state must be contiguous float32"):
        decoder.step(torch.tensor([[1]]), state)
    with pytest.raises(KernelInputError, match="mask must have 2 values"):
        decoder.step(torch.tensor([[1], [2]]), state, torch.ones(3))


def test_without_the_extension_decode_uses_the_reference(model, monkeypatch: pytest.MonkeyPatch) -> None:
    module = model.module
    module.backend = "auto"
    with torch.inference_mode():
        want = module(torch.tensor([[3]]), module.new_cache(1))
        monkeypatch.setattr(kernels, "HAVE_C", False)
        monkeypatch.setattr(kernels, "_c", None)
        module._fused_decoder = None
        got = module(torch.tensor([[3]]), module.new_cache(1))
    assert module._fused_decoder is None
    assert_same(got, want)


def test_struct_mirrors_match_the_c_structs(model) -> None:
    assert fused.layout_mismatches() == []
    decoder = fused.FusedDecoder(model.module)
    view, layer0 = decoder.view, decoder.view.layers[0]
    lm_head, attn = model.module.lm_head, model.module.layers[0].attn
    assert (view.num_layers, view.hidden, view.vocab) == (model.spec.num_layers, model.spec.hidden_size,
                                                          model.spec.vocab_size)
    assert view.lm_head.codes == lm_head.packed.data_ptr() and view.lm_head.scale == pytest.approx(lm_head.scale)
    assert layer0.f_proj.gain == attn.f_proj.norm_weight.data_ptr() and layer0.lower_bound is None


def test_a_mirror_that_drifts_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    class Shifted(ctypes.Structure):  # scale and gain swapped: same size, other offsets
        _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_float), ("gain", ctypes.c_void_p)]
    monkeypatch.setitem(fused.MIRRORS, "hgrn_bitlinear_t", Shifted)
    found = fused.layout_mismatches()
    assert any("hgrn_bitlinear_t has fields" in f for f in found)
    assert any("hgrn_bitlinear_t.gain is at 8" in f for f in found)
