"""The int4 weight format (W4A8, groups of 64) and its C products against the plain PyTorch reference."""
from __future__ import annotations

import os

import pytest
import torch

from memwise import kernels
from memwise.kernels import KernelInputError, int4
from memwise.kernels.int4 import Int4Matrix

from reference_checks import assert_same_on_thread_counts

PATHS = kernels.isa_paths() if not os.environ.get("MEMWISE_ISA") else kernels._machine_isas()
# K below one group, K padded (65, 127, 300), several groups not a multiple of the 4 reduced together,
# groups past the AVX-512 path's eight (read as pairs) with 2 (577) and 5 (830) left over, N not a
# multiple of the 4-row tile, M of 1 (GEMV) and more
SHAPES = [(1, 1, 1), (1, 5, 3), (3, 7, 65), (2, 13, 127), (5, 9, 300), (1, 6, 577), (2, 11, 830), (17, 33, 1000),
          (1, 64, 4096)]


def _matrix(n: int, k: int, seed: int) -> Int4Matrix:
    return Int4Matrix.from_float(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_group_dots_exact_on_every_isa(isa: str, m: int, n: int, k: int) -> None:
    weight = _matrix(n, k, seed=m * 1000 + k)
    q = torch.randint(-128, 128, (m, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    assert torch.equal(int4.int4_group_dots(q, weight, isa=isa), int4.int4_group_dots_reference(q, weight))


@pytest.mark.parametrize("isa", PATHS)
def test_group_dots_extremes(isa: str) -> None:
    """Codes 15 against q = -128 and 127 over many groups: the largest per-group sums, and sign."""
    k = 64 * 17
    weight = Int4Matrix(int4.pack_codes(torch.full((2, k), 15, dtype=torch.uint8)), torch.ones(2, 17, 2, dtype=torch.float16),
                        2, k)
    q = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8)])
    dots = int4.int4_group_dots(q, weight, isa=isa)
    assert dots[0].eq(-128 * 15 * 64).all() and dots[1].eq(127 * 15 * 64).all()


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("m,n,k", [(1, 37, 300), (4, 9, 64), (2, 130, 1024), (1, 7, 830)])
def test_linear_equals_reference_bit_for_bit(isa: str, m: int, n: int, k: int) -> None:
    """The float combine is done in the documented order on every path: not close, equal."""
    g = torch.Generator().manual_seed(n + k)
    w, x, bias = torch.randn(n, k, generator=g), torch.randn(m, 3, k, generator=g) * 4, torch.randn(n, generator=g)
    weight = Int4Matrix.from_float(w)
    out = int4.int4_linear(x, weight, bias, isa=isa)
    assert out.shape == (m, 3, n)
    assert torch.equal(out, int4.int4_linear_reference(x, weight, bias))


def test_weight_quantization_is_asymmetric_min_max_per_group() -> None:
    w = torch.zeros(2, 70)
    w[0, :64] = torch.linspace(-1.0, 2.0, 64)     # one full group: min -1, max 2
    w[0, 64:] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])   # a constant, padded group
    w[1, :64] = 3.0
    codes, params = int4.quantize_weight(w)
    assert codes.shape == (2, 128) and params.shape == (2, 2, 2) and params.dtype == torch.float16
    # 0.2 is not a float16: the scale is rounded up (0.2000732), the zero -1 is one already
    assert params[0, 0].tolist() == [0.2000732421875, -1.0]
    assert codes[0, 0] == 0 and codes[0, 63] == 15
    assert params[0, 1].tolist() == [0.0, 0.5] and codes[0, 64:].eq(0).all()   # scale 0, padding code 0
    assert params[1, 0].tolist() == [0.0, 3.0] and params[1, 1].tolist() == [0.0, 0.0]
    m = Int4Matrix.from_float(w)
    assert torch.equal(m.dequantize()[0, 64:], w[0, 64:]) and torch.equal(m.dequantize()[1], w[1])
    assert m.nbytes == 2 * 64 + 2 * 2 * 2 * 2     # codes, then 2 rows x 2 groups x (scale, zero) x 2 bytes


def test_packed_layout_low_nibbles_first_half_high_nibbles_second() -> None:
    codes = (torch.arange(128) % 16).to(torch.uint8).view(1, 128)
    packed = int4.pack_codes(codes)
    assert packed.shape == (1, 64)
    assert int(packed[0, 0]) == (codes[0, 0] | (codes[0, 32] << 4))
    assert int(packed[0, 32 + 5]) == (codes[0, 64 + 5] | (codes[0, 96 + 5] << 4))
    assert torch.equal(int4.unpack_codes(packed), codes)


def test_dequantized_weights_are_within_half_a_step() -> None:
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(3))
    m = Int4Matrix.from_float(w)
    step = m.params[..., 0].float().repeat_interleave(64, dim=1)[:, :200]
    assert bool(((m.dequantize() - w).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all())


def test_bad_inputs_are_one_clear_error() -> None:
    weight = _matrix(4, 10, seed=0)
    with pytest.raises(kernels.KernelInputError, match="K=11 columns.*expects 10"):
        int4.int4_group_dots(torch.zeros(1, 11, dtype=torch.int8), weight)
    with pytest.raises(kernels.KernelInputError, match=r"float tensor \[\.\.\., 10\]"):
        int4.int4_linear(torch.zeros(1, 11), weight)
    with pytest.raises(kernels.KernelInputError, match=r"bias must be float32 \[4\]"):
        int4.int4_linear(torch.zeros(1, 10), weight, torch.zeros(5))
    with pytest.raises(kernels.KernelInputError, match=r"codes of a 4x10 matrix must be contiguous uint8 \[4, 32\]"):
        int4.int4_linear(torch.zeros(1, 10), Int4Matrix(weight.codes[:, :16], weight.params, 4, 10))


def test_zero_rows_and_reference_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = _matrix(6, 70, seed=4)
    assert int4.int4_linear(torch.zeros(0, 70), weight).shape == (0, 6)
    x = torch.randn(3, 70)
    with_c = int4.int4_linear(x, weight)
    monkeypatch.setattr(int4, "_c", None)
    assert torch.equal(int4.int4_linear(x, weight), with_c)


def test_result_does_not_depend_on_thread_count() -> None:
    weight = _matrix(50, 500, seed=5)
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(6))
    assert_same_on_thread_counts(lambda: int4.int4_linear(x, weight))


def test_linear_kernel_equals_int4_linear() -> None:
    """The kernel a model keeps per matrix (checks done once) gives int4_linear's result."""
    g = torch.Generator().manual_seed(6)
    weight, bias = Int4Matrix.from_float(torch.randn(70, 700, generator=g)), torch.randn(70, generator=g)
    kernel = int4.linear_kernel(weight, bias)
    for x in (torch.randn(3, 700, generator=g), torch.randn(1, 1, 700, generator=g)):
        for threads in (None, 1, 2):
            assert torch.equal(kernel(x, threads), int4.int4_linear(x, weight, bias, threads=threads))
    with pytest.raises(KernelInputError):
        kernel(torch.randn(2, 699))


def _halves(bits: list[int] | range) -> torch.Tensor:
    return torch.tensor(list(bits), dtype=torch.int32).to(torch.int16).view(torch.float16)


@pytest.mark.parametrize("isa", PATHS)
def test_every_finite_float16_constant_widens_exactly(isa: str) -> None:
    """Each path widens the float16 constants itself (F16C on the AVX paths, bit handling on the
    scalar one): with every finite float16 as a scale or a zero (subnormals, -0 included), one group
    per row, the products still equal the reference bit for bit."""
    finite = [*range(0x0000, 0x7C00), *range(0x8000, 0xFC00)]
    params = _halves(finite).view(-1, 1, 2)
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 16, (params.shape[0], 64), generator=g, dtype=torch.uint8)
    weight = Int4Matrix(int4.pack_codes(codes), params.contiguous(), params.shape[0], 64)
    x = torch.randn(2, 64, generator=g)
    assert torch.equal(int4.int4_linear(x, weight, isa=isa), int4.int4_linear_reference(x, weight))


@pytest.mark.parametrize("isa", PATHS)
def test_linear_with_odd_group_counts_and_subnormal_constants(isa: str) -> None:
    """Rows x groups that leave every length of tail to the 8- and 16-wide widening loops."""
    g = torch.Generator().manual_seed(9)
    for n, k in ((3, 64), (5, 130), (7, 1000), (9, 64 * 9 - 5)):
        w = torch.randn(n, k, generator=g) * 1e-6       # constants in float16's subnormal range
        w[0] += 3.0
        weight = Int4Matrix.from_float(w)
        x = torch.randn(3, k, generator=g)
        assert torch.equal(int4.int4_linear(x, weight, isa=isa), int4.int4_linear_reference(x, weight))


def test_codes_are_fitted_to_the_rounded_constants() -> None:
    """Weights far from zero with a narrow range (float16's step at 100 is 0.0625, the range 0.05):
    each weight is still within half a (rounded) step of its dequantized value, because the zero is
    rounded down and the scale up before the codes are chosen."""
    g = torch.Generator().manual_seed(10)
    w = torch.cat([100.0 + torch.rand(4, 300, generator=g) * 0.05, torch.randn(4, 300, generator=g) * 0.02 - 0.3])
    m = Int4Matrix.from_float(w)
    params = m.params.float()
    assert params.shape == (8, 5, 2)
    step = params[..., 0].repeat_interleave(64, dim=1)[:, :300]
    float32_rounding = w.abs() * 2.0 ** -22      # of w - zero and of code * scale + zero, near 100
    assert bool((m.dequantize() - w).abs().le(step / 2 + float32_rounding).all())
    per_group = torch.nn.functional.pad(w, (0, 20), value=float("inf")).view(8, 5, 64).amin(-1)
    assert bool((params[..., 1] <= per_group).all())


def test_tiny_ranges_dequantize_within_float16s_smallest_step() -> None:
    w = torch.randn(3, 128, generator=torch.Generator().manual_seed(11)) * 1e-9
    w[2] = 0.0
    m = Int4Matrix.from_float(w)
    scale = m.params[..., 0].float()
    assert bool(scale[:2].gt(0).all()) and bool(scale[2].eq(0).all())
    assert bool((m.dequantize() - w).abs().le(2.0 ** -24).all())
    assert torch.equal(m.dequantize()[2], w[2])


def test_constants_that_do_not_fit_float16_are_one_error() -> None:
    w = torch.zeros(3, 70)
    w[1, 66] = -1e5       # the zero (the min) overflows
    with pytest.raises(KernelInputError, match=r"^int4: mlp\.up row 11, columns 64\.\.69: weights from -100000 to 0 do "
                                               r"not fit float16 group constants \(finite, \|value\| <= 65504\)$"):
        int4.quantize_weight(w, where="mlp.up", first_row=10)
    w[1, 66] = 1e6        # the scale (the range / 15) overflows; a max of 1e5 would not
    with pytest.raises(KernelInputError, match="row 1, columns 64..69: weights from 0 to 1e"):
        int4.quantize_weight(w)
    w[1, 66] = float("nan")
    with pytest.raises(KernelInputError, match="row 1, columns 64..69"):
        int4.quantize_weight(w)
    w[1, 66] = -65504.0       # the largest float16 still fits
    assert int4.Int4Matrix.from_float(w).dequantize()[1, 66] == -65504.0
