"""The fused C decode step of HGRN-Bit models (memwise.kernels.fused) against the unfused path.

The unfused path ("c-unfused": one C BitLinear at a time plus torch ops, or "reference": plain
PyTorch) is the specification. Where the fused step reproduces torch's elementwise arithmetic and
RMS summation order (checked at run time and reported by fused.elementwise_matches_torch() and
kernels.rms_order_matches_torch()), logits and states must be bit-identical; elsewhere the only
allowed difference is the last bit of a sigmoid or silu, which moves an int8 activation by one step
now and then, so logits may differ by a few quantization steps of a row (TOLERANCE).
"""
from __future__ import annotations

import copy
import re
import os

import pytest
import torch

import memwise
from memwise import kernels
from memwise.kernels import KernelInputError, fused
from memwise.models import hgrn_bit
from memwise.presets import preset_config
from memwise.ternary import TernaryMatrix, bitlinear_reference, ternary_matmul_reference

from hgrn_checkpoints import hgrn_config, write_hgrn_checkpoint

pytestmark = pytest.mark.skipif(not fused.available(), reason="the C extension with the fused step is not built")

PATHS = kernels.isa_paths() if not os.environ.get("MEMWISE_ISA") else kernels._machine_isas()

# Bit-identical results are required where the fused step can reproduce torch exactly.
EXACT = fused.available() and fused.elementwise_matches_torch() and kernels.rms_order_matches_torch()
# Otherwise: an activation flipped by one int8 step changes a BitLinear output by m / s per weight,
# about 1/127 of the row's largest input over K inputs; a few such flips through a tiny model stay
# well below 1% of the largest logit.
TOLERANCE = 1e-2

CONFIGS = {
    # Lower bounds and gains that differ per layer and channel (the checkpoint writer's defaults).
    "h64": hgrn_config(64, 3, 301),
    # Widths off the vector length (torch's vector loop leaves a scalar tail: 80 = 64 + 16, and
    # the GLU's 200 = 192 + 8), two heads (per-head g norm), K off the 128-weight block.
    "h80-odd": hgrn_config(80, 3, 263, intermediate_size=200, num_heads=2),
    # Recurrence wider than the model (D = 2H), no lower bounds.
    "expand2": hgrn_config(64, 2, 128, expand_ratio=2, use_lower_bound=False),
}


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    if EXACT:
        assert torch.equal(got, want), f"max |diff| {float((got - want).abs().max())}"
    else:
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= TOLERANCE * scale


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


# ---- elementwise functions ------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 45), (3, 96), (5, 200), (17, 1000), (40, 1000), (17, 2816)])
@pytest.mark.parametrize("threads", [1, 2])
def test_activations_match_torch(rows: int, cols: int, threads: int) -> None:
    # 40 x 1000 and 17 x 2816 exceed torch's grain of 32768 elements: with two threads torch
    # splits them into chunks, each with its own scalar tail, mid-row for 17 x 2816.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(rows * cols)
        x = torch.randn(rows, cols, generator=gen) * 8
        wide = torch.randn(rows, 2 * cols, generator=gen) * 8
        for got, want in ((fused.activation(x, "sigmoid"), torch.sigmoid(x)),
                          (fused.activation(x, "silu"), torch.nn.functional.silu(x)),
                          # The GLU's gate is the strided first half of its projection.
                          (fused.activation(wide[:, :cols], "silu"), torch.nn.functional.silu(wide[:, :cols]))):
            if fused.elementwise_matches_torch():
                assert torch.equal(got.view(torch.int32), want.view(torch.int32))
            else:
                assert torch.allclose(got, want, rtol=2e-7, atol=1e-30)
    finally:
        torch.set_num_threads(previous)


def test_activation_extremes() -> None:
    x = torch.tensor([[-200.0, -104.5, -103.9, -88.0, -1e-30, 0.0, 1e-30, 88.0, 88.8, 99.9, 100.5, 200.0,
                       float("inf"), float("-inf")] + [0.5] * 18])
    for kind, fn in (("sigmoid", torch.sigmoid), ("silu", torch.nn.functional.silu)):
        got, want = fused.activation(x, kind), fn(x)
        assert torch.equal(got.isnan(), want.isnan())
        if fused.elementwise_matches_torch():
            assert torch.equal(got.nan_to_num(), want.nan_to_num())


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
def test_thread_counts(threads: int, shared) -> None:
    # With fewer rows than threads, threads share a row: each quantizes its part of the row and
    # the parts' sums meet after a barrier; with more, each takes whole rows.  Seven threads leave
    # thread 0 no part of a 96-wide row (parts are multiples of 16), and outnumber the cores of
    # small machines, where the step's barrier must yield.
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


def test_large_rows_chunked_like_torch() -> None:
    # B x D and B x I above torch's grain of 32768 with two threads: torch computes the gates in two
    # chunks whose boundaries fall mid-row and off the vector length; the fused step must follow.
    config = {**preset_config("tiny-mmfree"), "hidden_size": 2080, "intermediate_size": 2000,
              "num_hidden_layers": 1, "vocab_size": 64}
    spec = hgrn_bit.spec_from_config(config, "test")
    module = hgrn_bit.synthetic(spec, seed=2)
    _randomize_gains(module, seed=2)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids, mask = random_prompts(17, 2, spec.vocab_size, seed=3)
        decode_side_by_side(module, ids, mask, steps=1)
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
    # leave a partial group; products exact and BitLinear equal to the plain PyTorch reference.
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
    if kernels.rms_order_matches_torch():
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


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
    # The plan turns far prefetches on when the weights outgrow the last-level cache.  Forced on,
    # with matrices long enough (hundreds of KB per thread) that the far prefetches land inside
    # them, the step must give the same bits.
    config = {**preset_config("tiny-mmfree"), "hidden_size": 512, "intermediate_size": 1408,
              "num_hidden_layers": 1, "vocab_size": 4000}
    module = hgrn_bit.synthetic(hgrn_bit.spec_from_config(config, "test"), seed=4)
    _randomize_gains(module, seed=4)
    monkeypatch.setattr(kernels, "_last_level_cache_bytes", lambda: 1 << 40)
    cached = fused.FusedDecoder(module)
    monkeypatch.setattr(kernels, "_last_level_cache_bytes", lambda: 1 << 20)
    streaming = fused.FusedDecoder(module)
    assert not cached.streams_from_dram and streaming.streams_from_dram
    assert int(cached.plan[9]) == 0 and int(streaming.plan[9]) == 1
    width = module.spec.hidden_size * module.spec.expand_ratio
    for batch in (1, 2):
        a = torch.zeros((1, batch, width))
        b = torch.zeros((1, batch, width))
        for token in (5, 9, 3):
            ids = torch.full((batch, 1), token)
            assert torch.equal(cached.step(ids, a), streaming.step(ids, b))
            assert torch.equal(a, b)


def test_plan_dropped_when_buffers_move(model) -> None:
    module = model.module
    module.backend = "auto"
    with torch.inference_mode():
        first = module(torch.tensor([[7]]), module.new_cache(1))
        assert module._fused_decoder is not None
        module.float()
        assert module._fused_decoder is None
        again = module(torch.tensor([[7]]), module.new_cache(1))
        module(torch.tensor([[7]]), module.new_cache(1))
        twin = copy.deepcopy(module)  # the copy must not share (or fail to copy) the plan
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
    with pytest.raises(KernelInputError, match="unknown activation"):
        fused.activation(torch.zeros(1, 4), "tanh")


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


def test_step_phases_instruments_every_barrier_of_the_step() -> None:
    # benchmarks/step_phases.py times the step by rewriting its barriers; it must keep finding all
    # of them (and only them) as the step's source changes.
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("step_phases", root / "benchmarks" / "step_phases.py")
    step_phases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_phases)
    source = (root / "src" / "memwise" / "kernels" / "hgrn_step.h").read_text()
    lines = source.splitlines()
    first = next(n for n, line in enumerate(lines, 1) if line.startswith("static void hgrn_step_run("))
    last = next(n for n, line in enumerate(lines, 1) if n > first and line.startswith("#undef SYNC"))
    barriers = [n for n in range(first, last) if lines[n - 1].strip() == "SYNC"]
    assert len(barriers) >= 10
    out = step_phases.instrumented(source)
    timed = [int(n) for n in re.findall(r"PROF_LEAVE\(\d+, (\d+)\)", out)]
    assert timed[:-1] == barriers and lines[timed[-1] - 1] == "#undef sums"   # the lm_head, last
    assert len(re.findall(r"PROF_ARRIVE\(\d+\)", out)) == len(barriers) + 1
    assert out.count("SYNC PROF_LEAVE") == len(barriers) and "atexit(prof_dump)" in out
