"""The bfloat16-weight product (memwise.kernels.bf16) on every path this machine has, against its
PyTorch reference: float32 sums in another order, so equal to float32 rounding."""
from __future__ import annotations

import pytest
import torch

from memwise.kernels import KernelInputError, isa_paths
from memwise.kernels.bf16 import bf16_linear, bf16_linear_reference

SHAPES = [(1, 1, 1), (7, 5, 1), (33, 100, 3), (130, 1537, 6), (9, 16, 4), (517, 264, 5), (1030, 2048, 8)]


@pytest.mark.parametrize("isa", isa_paths())
@pytest.mark.parametrize("rows, cols, batch", SHAPES)
def test_matches_reference(isa, rows, cols, batch):
    generator = torch.Generator().manual_seed(rows * 31 + cols)
    weight = torch.randn(rows, cols, generator=generator).bfloat16()
    x = torch.randn(batch, cols, generator=generator)
    want = bf16_linear_reference(x, weight)
    got = bf16_linear(x, weight, isa)
    assert got.dtype == torch.float32 and got.shape == (batch, rows)
    # each output is a sum of `cols` products: allow float32 rounding of that many terms
    bound = 4 * cols * torch.finfo(torch.float32).eps * (x.abs() @ weight.float().abs().T)
    assert bool(((got - want).abs() <= bound + 1e-30).all())


def test_leading_dimensions_and_special_values():
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]).bfloat16()
    x = torch.tensor([[[2.0, 1.0, 4.0]], [[0.0, 0.0, 0.0]]])
    got = bf16_linear(x, weight)
    assert torch.equal(got, torch.tensor([[[2.0, -1.0]], [[0.0, 0.0]]]))
    inf = bf16_linear(torch.tensor([[float("inf"), 0.0, 0.0]]), weight)
    assert inf[0, 0] == float("inf") and torch.isnan(inf[0, 1])


@pytest.mark.parametrize("x, weight, message", [
    (torch.zeros(1, 4), torch.zeros(2, 4), "bfloat16"),
    (torch.zeros(1, 4), torch.zeros(4, 2).bfloat16().T, "contiguous"),
    (torch.zeros(1, 3), torch.zeros(2, 4).bfloat16(), r"float32 \[\.\.\., 4\]"),
    (torch.zeros(1, 4, dtype=torch.float64), torch.zeros(2, 4).bfloat16(), "float32"),
])
def test_bad_input_is_one_clear_error(x, weight, message):
    with pytest.raises(KernelInputError, match=message):
        bf16_linear(x, weight)
