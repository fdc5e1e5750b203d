"""The int8 weight format (W8A8) and its C products against the plain PyTorch reference."""
from __future__ import annotations

import os

import pytest
import torch

from memwise import kernels
from memwise.kernels import KernelInputError, int8
from memwise.kernels.int8 import Int8Matrix

from reference_checks import assert_same_on_thread_counts

PATHS = kernels.isa_paths() if not os.environ.get("MEMWISE_ISA") else kernels._machine_isas()
# odd K (padding), K past one 64-column block, N not a multiple of the 4-row tile, M of 1 (GEMV) up to
# 4 (one weight row at a time) and more (4-row tiles)
SHAPES = [(1, 1, 1), (1, 5, 3), (3, 7, 65), (2, 13, 127), (4, 10, 130), (5, 9, 200), (17, 33, 1000), (1, 64, 4096)]


def _matrix(n: int, k: int, seed: int) -> Int8Matrix:
    g = torch.Generator().manual_seed(seed)
    return Int8Matrix.from_int8(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                                torch.rand(n, generator=g) + 0.01)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matmul_exact_on_every_isa(isa: str, m: int, n: int, k: int) -> None:
    weight = _matrix(n, k, seed=m * 1000 + k)
    q = torch.randint(-128, 128, (m, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    assert torch.equal(int8.int8_matmul(q, weight, isa=isa), int8.int8_matmul_reference(q, weight))


# Many activation rows (a prefill): the AVX-512 VNNI path's register tiles of 4 weight rows x 6
# activation rows, with M not a multiple of 6, N not of 4 (the last weight rows go one tile at a
# time), and K from one to many 64-byte steps, past the rows one L2 pass keeps (8000 columns:
# 48 rows a pass, so 200 rows are four whole passes and a part).
TILE_SHAPES = [(m, n, k) for m in (5, 8, 31, 32, 33, 64, 200) for n, k in ((27, 70), (8, 1000))] + \
    [(6, 4, 1), (13, 11, 64), (200, 9, 8000), (49, 6, 8000)]


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("m,n,k", TILE_SHAPES)
def test_matmul_exact_on_register_tiles(isa: str, m: int, n: int, k: int) -> None:
    weight = _matrix(n, k, seed=m * 7 + n)
    q = torch.randint(-128, 128, (m, k), generator=torch.Generator().manual_seed(m + k), dtype=torch.int8)
    assert torch.equal(int8.int8_matmul(q, weight, isa=isa), int8.int8_matmul_reference(q, weight))


def test_linear_is_the_same_float_on_every_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int32 sums are exact on every path and the rescale is one piece of code, so a batch of rows
    (register tiles on AVX-512 VNNI) gives the same floats as the scalar path, bit for bit."""
    g = torch.Generator().manual_seed(8)
    weight, bias = Int8Matrix.from_float(torch.randn(23, 200, generator=g)), torch.randn(23, generator=g)
    x = torch.randn(37, 200, generator=g) * 3
    outs = []
    for isa in PATHS:
        monkeypatch.setenv("MEMWISE_ISA", isa)
        outs.append(int8.int8_linear(x, weight, bias))
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("isa", PATHS)
def test_matmul_extreme_accumulators(isa: str) -> None:
    """Largest magnitudes: q = -128 (whose negation does not fit in int8) against w = +-127 over a long row."""
    k = 20000
    weight = Int8Matrix.from_int8(torch.tensor([[127] * k, [-127] * k, [127, -127] * (k // 2)], dtype=torch.int8),
                                  torch.ones(3))
    q = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8)])
    out = int8.int8_matmul(q, weight, isa=isa)
    assert out[0, 0] == -128 * 127 * k and out[0, 1] == 128 * 127 * k and out[0, 2] == 0
    assert torch.equal(out, int8.int8_matmul_reference(q, weight))


@pytest.mark.parametrize("isa", PATHS)
def test_linear_matches_reference(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWISE_ISA", isa)
    g = torch.Generator().manual_seed(1)
    w, x, bias = torch.randn(37, 300, generator=g), torch.randn(2, 3, 300, generator=g) * 4, torch.randn(37, generator=g)
    weight = Int8Matrix.from_float(w)
    out, ref = int8.int8_linear(x, weight, bias), int8.int8_linear_reference(x, weight, bias)
    assert out.shape == (2, 3, 37)
    # float rescale in the kernel's order: equal to rounding
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5 * float(ref.abs().max()))


def test_quantized_tokens_match_reference_bit_for_bit() -> None:
    x = torch.randn(9, 333, generator=torch.Generator().manual_seed(2)) * 10
    x[3] = 0.0                  # the 1e-5 floor
    x[4, 7] = 1e6               # one outlier
    q, s = int8.quantize_tokens(x)
    q_ref, s_ref = int8.quantize_tokens_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert int(q.abs().max()) == 127


def test_weight_quantization_is_symmetric_per_row_half_to_even() -> None:
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.54, 1.27, 0.01, 2.54]])
    q, scale = int8.quantize_weight(w)
    assert scale.tolist() == pytest.approx([1 / 127, 0.0, 2.54 / 127])
    assert q[0].tolist() == [127, -64, 32, 0]       # -63.5 and 31.75 rounded: half to even, then nearest
    assert q[1].tolist() == [0, 0, 0, 0]            # an all-zero row stays zero (scale 0)
    assert q[2].tolist() == [-127, 64, 0, 127] and int(q.min()) >= -127
    m = Int8Matrix.from_float(w)
    assert m.weight.shape == (3, 64) and m.row_sums.tolist() == [95, 0, 64]
    assert m.nbytes == 3 * 64 + 8 * 3


def test_dequantized_weights_are_within_half_a_step() -> None:
    w = torch.randn(16, 100, generator=torch.Generator().manual_seed(3))
    m = Int8Matrix.from_float(w)
    error = (m.values().float() * m.scale[:, None] - w).abs()
    assert bool((error <= m.scale[:, None] / 2 * (1 + 1e-5)).all())


def test_bad_inputs_are_one_clear_error() -> None:
    weight = _matrix(4, 10, seed=0)
    with pytest.raises(kernels.KernelInputError, match="K=11 columns.*expects 10"):
        int8.int8_matmul(torch.zeros(1, 11, dtype=torch.int8), weight)
    with pytest.raises(kernels.KernelInputError, match="int8 tensor"):
        int8.int8_matmul(torch.zeros(1, 10), weight)
    with pytest.raises(kernels.KernelInputError, match="-128 is not used"):
        Int8Matrix.from_int8(torch.full((1, 3), -128, dtype=torch.int8), torch.ones(1))
    with pytest.raises(kernels.KernelInputError, match=r"bias must be float32 \[4\]"):
        int8.int8_linear(torch.zeros(1, 10), weight, torch.zeros(5))


def test_zero_rows_and_reference_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = _matrix(6, 70, seed=4)
    assert int8.int8_linear(torch.zeros(0, 70), weight).shape == (0, 6)
    x = torch.randn(3, 70)
    with_c = int8.int8_linear(x, weight)
    monkeypatch.setattr(int8, "_c", None)
    torch.testing.assert_close(int8.int8_linear(x, weight), with_c, rtol=1e-6, atol=1e-6)


def test_result_does_not_depend_on_thread_count() -> None:
    weight = _matrix(50, 500, seed=5)
    for m in (3, 33):           # one weight row at a time; register tiles
        q = torch.randint(-128, 128, (m, 500), dtype=torch.int8)
        assert_same_on_thread_counts(lambda: int8.int8_matmul(q, weight))


def test_linear_kernel_equals_int8_linear() -> None:
    """The kernel a model keeps per matrix (checks done once) gives int8_linear's result, on any thread
    count, for a batch of rows, a decode row and float64 input; without the extension, the reference."""
    g = torch.Generator().manual_seed(6)
    weight, bias = Int8Matrix.from_float(torch.randn(70, 130, generator=g)), torch.randn(70, generator=g)
    kernel = int8.linear_kernel(weight, bias)
    for x in (torch.randn(3, 130, generator=g), torch.randn(1, 1, 130, generator=g), torch.randn(2, 130).double()):
        for threads in (None, 1, 2):
            assert torch.equal(kernel(x, threads), int8.int8_linear(x, weight, bias, threads))
    with pytest.raises(KernelInputError):
        kernel(torch.randn(2, 129))
    with pytest.raises(KernelInputError):
        int8.linear_kernel(weight, torch.randn(69))
