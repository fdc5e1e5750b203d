"""Products of float32 activations with bfloat16 weights, accumulated in float32.

For the full-precision matrices of otherwise ternary models (BitNet's lm_head, the bf16 embedding):
a decode step reads such a matrix once at 2 bytes per weight, widening each weight to float32 in a
register (`memwise.kernels._bf16`), instead of converting the matrix to a float32 copy first. The
reference is `x @ W.float().T`; the C paths sum in another order, so they agree with it to float32
rounding, not bit for bit.
"""
from __future__ import annotations

import torch

from memwise.kernels import KernelInputError, isa_id, num_threads, resolve_isa

try:
    from memwise.kernels import _bf16 as _c
except ImportError:  # no compiler at install time: the reference runs
    _c = None

# Activation rows up to which the C kernel runs; more rows (a prefill's logits at every position) are
# compute-bound, where torch's GEMM over float32 chunks of W does better.
MAX_ROWS = 8

__all__ = ["MAX_ROWS", "bf16_linear", "bf16_linear_reference"]


def bf16_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.float() @ weight.float().T


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """x [..., K] float32 @ W [N, K] bfloat16 -> float32 [..., N] on the path `isa` (default: the best)."""
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.bfloat16 or weight.dim() != 2 \
            or not weight.is_contiguous():
        raise KernelInputError(f"weight must be a contiguous 2-d bfloat16 tensor, got "
                               f"{getattr(weight, 'dtype', type(weight).__name__)} {list(getattr(weight, 'shape', []))}")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise KernelInputError(f"activations must be float32 [..., {weight.shape[1]}], got "
                               f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    if x.device != weight.device:
        raise KernelInputError(f"weights are on {weight.device}, activations on {x.device}")
    name = resolve_isa(isa)
    rows = x.reshape(-1, weight.shape[1]).contiguous()
    if _c is None or x.device.type != "cpu":
        return bf16_linear_reference(rows, weight).reshape(*x.shape[:-1], weight.shape[0])
    out = torch.empty((rows.shape[0], weight.shape[0]), dtype=torch.float32)
    if rows.shape[0]:
        _c.linear(isa_id(name), weight.data_ptr(), weight.shape[0], weight.shape[1], rows.data_ptr(), rows.shape[0],
                  out.data_ptr(), num_threads())
    return out.reshape(*x.shape[:-1], weight.shape[0])
