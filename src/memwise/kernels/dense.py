"""Products of float32 activations with dense float32 weights for the few rows of a decode step.

A batch-1 decode step of a float32 model is a chain of matrix-vector products, each reading its
matrix once at 4 bytes per weight for two flops: memory bandwidth sets its speed. The C extension
(`memwise.kernels._dense`, csrc/dense_module.c) streams each matrix once per call, output rows
split over threads in contiguous tiles, for up to MAX_ROWS activation rows; more rows (a prefill)
are compute-bound, where torch's GEMM does better, and go to F.linear. `linear` is what a model
calls: float32 weights take this kernel, bfloat16 weights the bf16 kernel (memwise.kernels.bf16),
anything else, or anything off the CPU, F.linear.

Tolerance. The C paths sum in the order csrc/dense_module.c documents: L lane sums of K / L fused
products each, then a pairwise tree over the L lanes (L = 16 on AVX-512, 8 on AVX2, 1 on the scalar
path). The classic bound for a sum computed that way is |y - exact| <= (ceil(K / L) + log2(L) + 1)
* u * sum_k |w_k x_k| (+ u |b|), u = 2^-24 (`error_bound`), independent of how torch orders its own
sum; torch's result lies within the same kind of bound of the exact one, so the two differ by at
most the sum of both, a few times 1e-5 of sum |w x| at K = 4096 in the worst case, and in practice
(errors of random sign) about sqrt(K) * u of it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memwise.kernels import KernelInputError, isa_id, num_threads, resolve_isa
from memwise.kernels import bf16

try:
    from memwise.kernels import _dense as _c
except ImportError:  # no compiler at install time: F.linear runs
    _c = None

# Activation rows up to which a product is a decode step's and goes to the C kernel.
MAX_ROWS = 8
LANES = {"avx512vnni": 16, "amx": 16, "avx2": 8, "avxvnni": 8, "scalar": 1}
UNIT_ROUNDOFF = 2.0 ** -24

__all__ = ["MAX_ROWS", "error_bound", "f32_linear", "f32_linear_reference", "linear"]


def f32_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def error_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, isa: str) -> torch.Tensor:
    """The bound above on |f32_linear(x, weight, bias, isa) - the exact product|, [M, N] (float64)."""
    lanes = LANES[isa]
    k = weight.shape[1]
    terms = math.ceil(k / lanes) + math.log2(lanes) + 1
    magnitude = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return terms * UNIT_ROUNDOFF * magnitude


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dtype != dtype or weight.dim() != 2 \
            or not weight.is_contiguous():
        raise KernelInputError(f"weight must be a contiguous 2-d {str(dtype)[6:]} tensor, got "
                               f"{getattr(weight, 'dtype', type(weight).__name__)} {list(getattr(weight, 'shape', []))}")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise KernelInputError(f"activations must be float32 [..., {weight.shape[1]}], got "
                               f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32
                             or tuple(bias.shape) != (weight.shape[0],) or not bias.is_contiguous()):
        raise KernelInputError(f"bias must be contiguous float32 [{weight.shape[0]}], got "
                               f"{getattr(bias, 'dtype', type(bias).__name__)} {list(getattr(bias, 'shape', []))}")
    if x.device != weight.device or (bias is not None and bias.device != weight.device):
        raise KernelInputError(f"weights are on {weight.device}, activations on {x.device}")


def f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """x [..., K] float32 @ W [N, K] float32 (+ b [N]) -> float32 [..., N] on the path `isa` (default:
    MEMWISE_ISA or the best) with `threads` threads (default: torch's count). Any number of rows
    works; MAX_ROWS is where a model stops calling it."""
    _check(x, weight, bias, torch.float32)
    name = resolve_isa(isa)
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    if _c is None or x.device.type != "cpu" or rows.shape[0] == 0 or n == 0 or k == 0:
        return f32_linear_reference(x, weight, bias)
    out = torch.empty((rows.shape[0], n), dtype=torch.float32)
    _c.linear(isa_id(name), weight.data_ptr(), n, k, rows.data_ptr(), rows.shape[0],
              0 if bias is None else bias.data_ptr(), out.data_ptr(), threads or num_threads())
    return out.reshape(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           threads: int | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the decode kernels where they apply (module docstring), the
    float32 one on `threads` threads (default: torch's count)."""
    if x.device.type != "cpu" or x.numel() > MAX_ROWS * x.shape[-1] or _c is None or weight.requires_grad:
        return F.linear(x, weight, bias)
    if weight.dtype == torch.float32 and x.dtype == torch.float32 and weight.is_contiguous():
        return f32_linear(x, weight, bias, threads=threads)
    if weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and weight.is_contiguous() \
            and x.shape[-1] == weight.shape[1] and bf16._c is not None:
        # float32 sums rounded once to bfloat16, as torch's bfloat16 GEMM does
        y = bf16.bf16_linear(x.float(), weight)
        if bias is not None:
            y += bias.float()
        return y.to(torch.bfloat16)
    return F.linear(x, weight, bias)
