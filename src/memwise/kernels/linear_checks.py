"""What the quantized-weight linears (int8.py, int4.py, nf4.py) share around their C calls: the checks
of the activations, the input and the bias, the float32 rows handed to C, and linear_kernel's
checks-once wrapper. Each scheme keeps its own format checks and C call."""
from __future__ import annotations

from typing import Callable

import torch

from memwise.kernels import KernelInputError

Product = Callable[[torch.Tensor, "int | None"], torch.Tensor]


def check_activations(q: torch.Tensor, weight, check_matrix: Callable[[object, torch.device], None],
                      scheme: str) -> None:
    """q must be int8 [M, weight.cols], and weight a well-formed matrix of its scheme (check_matrix)."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise KernelInputError(f"activations must be a 2-d int8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    check_matrix(weight, q.device)
    if q.shape[1] != weight.cols:
        raise KernelInputError(f"activations have K={q.shape[1]} columns, the {scheme} matrix expects {weight.cols}")


def check_input(x: torch.Tensor, cols: int, scheme: str) -> None:
    """x must be a float tensor [..., cols]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != cols:
        raise KernelInputError(f"{scheme} linear input must be a float tensor [..., {cols}], got "
                               f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")


def check_bias(bias: torch.Tensor | None, rows: int, scheme: str) -> None:
    """bias must be None or contiguous float32 [rows]."""
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (rows,)
                             or not bias.is_contiguous()):
        raise KernelInputError(f"{scheme} linear bias must be float32 [{rows}], got {bias.dtype} {list(bias.shape)}")


def float32_rows(x: torch.Tensor, cols: int) -> torch.Tensor:
    """x [..., cols] as contiguous float32 [M, cols] (x itself, reshaped, when it already is)."""
    rows = x.reshape(-1, cols)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.float().contiguous()
    return rows


def checked_once(device: torch.device, cols: int, use_c: Callable[[torch.device], bool], fast: Product,
                 checked: Product) -> Product:
    """linear_kernel's f(x, threads=None): `fast` (the C path with the matrix and bias checked once,
    by the caller) when x is a float [..., cols] on `device` and use_c(device) holds at the call,
    else `checked` (the linear with every check, which also raises the errors)."""
    def run(x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        if (not use_c(device) or x.device != device or not x.is_floating_point() or x.dim() < 1
                or x.shape[-1] != cols):
            return checked(x, threads)
        return fast(x, threads)
    return run
