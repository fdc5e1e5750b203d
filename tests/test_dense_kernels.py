"""The float32 decode GEMV (memwise.kernels.dense) on every path this machine has: within its
documented error bound of the exact product (float64), and within 1e-5 of torch's F.linear relative
to the product's magnitude (sum |w x| + |b|); the decode dispatch `linear` for each weight dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memwise.kernels import KernelInputError, isa_paths
from memwise.kernels import dense
from memwise.kernels.dense import error_bound, f32_linear, linear

# rows not a multiple of the 4-row tile, K not a multiple of 16 (nor of 8), 1..8 activation rows
SHAPES = [(1, 1, 1), (7, 5, 1), (33, 100, 3), (130, 1537, 6), (9, 16, 4), (517, 264, 5), (1030, 2048, 8),
          (1027, 4099, 2), (4, 17, 7)]
pytestmark = pytest.mark.skipif(dense._c is None, reason="the C extension memwise.kernels._dense is not built")


def magnitude(x, weight, bias):
    return x.double().abs() @ weight.double().abs().T + bias.double().abs()


@pytest.mark.parametrize("isa", isa_paths())
@pytest.mark.parametrize("rows, cols, batch", SHAPES)
def test_within_the_bound_of_its_summation_order_and_close_to_torch(isa, rows, cols, batch):
    generator = torch.Generator().manual_seed(rows * 31 + cols)
    weight = torch.randn(rows, cols, generator=generator)
    x = torch.randn(batch, cols, generator=generator)
    bias = torch.randn(rows, generator=generator)
    got = f32_linear(x, weight, bias, isa)
    assert got.dtype == torch.float32 and got.shape == (batch, rows)
    exact = x.double() @ weight.double().T + bias.double()
    assert bool(((got.double() - exact).abs() <= error_bound(x, weight, bias, isa)).all())
    relative = (got - F.linear(x, weight, bias)).abs().double() / magnitude(x, weight, bias)
    assert float(relative.max()) <= 1e-5


@pytest.mark.parametrize("isa", isa_paths())
def test_no_bias_leading_dimensions_and_special_values(isa):
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    x = torch.tensor([[[2.0, 1.0, 4.0]], [[0.0, 0.0, 0.0]]])
    assert torch.equal(f32_linear(x, weight, None, isa), torch.tensor([[[2.0, -1.0]], [[0.0, 0.0]]]))
    inf = f32_linear(torch.tensor([[float("inf"), 0.0, 0.0]]), weight, None, isa)
    assert inf[0, 0] == float("inf") and torch.isnan(inf[0, 1])


def test_matrix_over_many_threads_equals_one_thread():
    """The split over threads cuts rows, never a sum: the same bits on any thread count."""
    generator = torch.Generator().manual_seed(5)
    weight, x = torch.randn(2051, 300, generator=generator), torch.randn(3, 300, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = f32_linear(x, weight)
        torch.set_num_threads(4)
        assert torch.equal(f32_linear(x, weight), one)
    finally:
        torch.set_num_threads(threads)


def test_linear_takes_the_kernel_for_few_rows_and_torch_for_many():
    generator = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(70, 33, generator=generator), torch.randn(70, generator=generator)
    few, many = torch.randn(1, 8, 33, generator=generator), torch.randn(1, 9, 33, generator=generator)
    assert torch.equal(linear(few, weight, bias), f32_linear(few, weight, bias))
    assert torch.equal(linear(many, weight, bias), F.linear(many, weight, bias))


def test_linear_on_bfloat16_weights_matches_torch_to_bfloat16_rounding():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(70, 130, generator=generator).bfloat16()
    bias = torch.randn(70, generator=generator).bfloat16()
    x = torch.randn(2, 130, generator=generator).bfloat16()
    got = linear(x, weight, bias)
    assert got.dtype == torch.bfloat16
    want = F.linear(x.float(), weight.float(), bias.float())
    # one rounding to bfloat16 (2^-8 relative) of a float32 sum
    bound = 2.0 ** -8 * want.abs() + 1e-5 * magnitude(x.float(), weight.float(), bias.float()).float()
    assert bool(((got.float() - want).abs() <= bound).all())


@pytest.mark.parametrize("x, weight, bias, message", [
    (torch.zeros(1, 4), torch.zeros(2, 4).bfloat16(), None, "float32"),
    (torch.zeros(1, 4), torch.zeros(4, 2).T, None, "contiguous"),
    (torch.zeros(1, 3), torch.zeros(2, 4), None, r"float32 \[\.\.\., 4\]"),
    (torch.zeros(1, 4, dtype=torch.float64), torch.zeros(2, 4), None, "float32"),
    (torch.zeros(1, 4), torch.zeros(2, 4), torch.zeros(3), r"bias must be contiguous float32 \[2\]"),
])
def test_bad_input_is_one_clear_error(x, weight, bias, message):
    with pytest.raises(KernelInputError, match=message):
        f32_linear(x, weight, bias)
