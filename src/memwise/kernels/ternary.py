"""The ternary products of the kernel library on torch tensors: checks, then the C path of this
machine's instruction set (memwise.kernels), Triton on CUDA, or the PyTorch reference (packed.py).

Module-level state (the C extension, HAVE_C, the chosen paths) belongs to the package memwise.kernels
and is read through it, so that a test that switches the extension off there switches it off here.
"""
from __future__ import annotations

import torch

from memwise import kernels
from memwise.errors import UnsupportedError
from memwise.kernels import BACKENDS, KernelInputError
from memwise.kernels.packed import (BLOCK_BYTES, TernaryMatrix, bitlinear_reference, padded_cols,
                                    quantize_activations, rmsnorm, ternary_matmul_reference)

__all__ = ["bitlinear", "ternary_matmul", "quantize_rows", "greedy_tokens", "have_triton"]


# --------------------------------------------------------------------------------------------
# Validation


def _check_weight(weight: TernaryMatrix, device: torch.device) -> None:
    if not isinstance(weight, TernaryMatrix):
        raise KernelInputError(f"weight must be a TernaryMatrix, got {type(weight).__name__}")
    p = weight.packed
    want = (weight.rows, padded_cols(weight.cols) // 4)
    if p.dtype != torch.uint8:
        raise KernelInputError(f"packed ternary weights must be uint8, got {p.dtype}")
    if tuple(p.shape) != want:
        raise KernelInputError(f"packed ternary weights of a {weight.rows}x{weight.cols} matrix must "
                               f"have shape {list(want)}, got {list(p.shape)}")
    if not p.is_contiguous():
        raise KernelInputError("packed ternary weights must be contiguous (row-major)")
    if weight.cols < 1 or weight.rows < 1:
        raise KernelInputError(f"ternary matrix must be non-empty, got {weight.rows}x{weight.cols}")
    if p.device != device:
        raise KernelInputError(f"packed ternary weights are on {p.device}, activations on {device}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise KernelInputError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "c" and not kernels.HAVE_C:
        raise UnsupportedError("backend 'c' requested but the C extension memwise.kernels._ternary "
                               "is not built (pip install -e . or python setup.py build_ext --inplace)")


def have_triton() -> bool:
    """Whether the Triton kernels can run (triton importable)."""
    from memwise.kernels import triton_ternary
    return triton_ternary.AVAILABLE


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend == "auto" and device.type != "cuda":
        return False
    if backend == "triton":
        if not have_triton():
            raise UnsupportedError("backend 'triton' requested but triton is not installed")
        return True
    return backend == "auto" and device.type == "cuda" and have_triton()


def _use_c(backend: str, device: torch.device) -> bool:
    if backend == "c" and device.type != "cpu":
        raise KernelInputError(f"backend 'c' runs on CPU tensors, got a tensor on {device}")
    return kernels.HAVE_C and device.type == "cpu" and backend in ("auto", "c")


# --------------------------------------------------------------------------------------------
# Public kernels


def ternary_matmul(q: torch.Tensor, weight: TernaryMatrix, isa: str | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Exact q [M, K] int8 x t [N, K] ternary -> int32 [M, N] (t = the weight's ternary values).

    `isa` picks a C path (default: MEMWISE_ISA or the best one); "scalar" without the extension
    means the reference.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise KernelInputError(f"activations must be an int8 tensor, got "
                               f"{getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() != 2:
        raise KernelInputError(f"activations must be 2-d [M, K], got shape {list(q.shape)}")
    _check_weight(weight, q.device)
    _check_backend(backend)
    if q.shape[1] != weight.cols:
        raise KernelInputError(f"activations have K={q.shape[1]} columns, the ternary matrix "
                               f"{weight.rows}x{weight.cols} expects {weight.cols}")
    name = kernels.resolve_isa(isa)
    m, n = q.shape[0], weight.rows
    if _use_triton(backend, q.device):
        from memwise.kernels import triton_ternary
        return triton_ternary.ternary_matmul(q.contiguous(), weight)
    if not _use_c(backend, q.device):
        return ternary_matmul_reference(q, weight.ternary())
    if weight.cols >= kernels.MAX_COLS:
        raise KernelInputError(f"K={weight.cols} is too large for the C kernels (limit {MAX_COLS})")
    out = torch.empty((m, n), dtype=torch.int32)
    if m == 0:
        return out
    q = q.contiguous()
    kernels._c.matmul(kernels._ISA_IDS[name], weight.packed.data_ptr(), n, weight.packed.shape[1] // BLOCK_BYTES,
              q.data_ptr(), m, weight.cols, out.data_ptr(), kernels.num_threads())
    return out


def _check_bitlinear_inputs(x: torch.Tensor, norm_weight: torch.Tensor, cols: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise KernelInputError(f"BitLinear input must be a floating-point tensor, got "
                               f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != cols:
        raise KernelInputError(f"BitLinear input has last dimension {x.shape[-1] if x.dim() else None},"
                               f" the ternary matrix expects K={cols}")
    if (not isinstance(norm_weight, torch.Tensor) or not norm_weight.is_floating_point()
            or tuple(norm_weight.shape) != (cols,)):
        raise KernelInputError(f"BitLinear norm weight must be a float tensor of shape [{cols}], got "
                               f"{list(getattr(norm_weight, 'shape', []))}")
    if norm_weight.device != x.device:
        raise KernelInputError(f"norm weight is on {norm_weight.device}, input on {x.device}")


def bitlinear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: TernaryMatrix,
              backend: str = "auto") -> torch.Tensor:
    """BitLinear: rmsnorm(x) * g -> per-row int8 -> exact ternary product -> acc * m / s.

    x [..., K] (any float dtype; computed in float32 like the reference) -> float32 [..., N].
    """
    _check_bitlinear_inputs(x, norm_weight, weight.cols)
    _check_weight(weight, x.device)
    _check_backend(backend)
    if _use_triton(backend, x.device):
        from memwise.kernels import triton_ternary
        return triton_ternary.bitlinear(x, norm_weight, eps, weight)
    if not _use_c(backend, x.device):
        return bitlinear_reference(x, norm_weight, eps, weight)
    if weight.cols >= kernels.MAX_COLS:
        raise KernelInputError(f"K={weight.cols} is too large for the C kernels (limit {MAX_COLS})")
    rows = (x if x.dim() == 2 else x.reshape(-1, weight.cols)).float().contiguous()
    g = norm_weight.float().contiguous()
    out = torch.empty((rows.shape[0], weight.rows), dtype=torch.float32)
    if rows.shape[0]:
        kernels._c.bitlinear(kernels._ISA_IDS[kernels.isa_paths()[0]], weight.packed.data_ptr(), weight.rows,
                     weight.packed.shape[1] // BLOCK_BYTES, float(weight.scale), rows.data_ptr(),
                     rows.shape[0], weight.cols, g.data_ptr(), float(eps), out.data_ptr(), kernels.num_threads())
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.rows)


def quantize_rows(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The activation half of BitLinear: (q int8 [M, K], s float32 [M, 1]) for x [M, K].

    The C kernels fuse this into bitlinear(); it is exposed to compare their q with the reference's.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise KernelInputError(f"quantize_rows expects a 2-d tensor [M, K], got "
                               f"{list(getattr(x, 'shape', []))}")
    _check_bitlinear_inputs(x, norm_weight, x.shape[1])
    _check_backend(backend)
    if not _use_c(backend, x.device) or backend == "triton":
        return quantize_activations(rmsnorm(x, norm_weight, eps))
    rows = x.float().contiguous()
    g = norm_weight.float().contiguous()
    q = torch.empty(rows.shape, dtype=torch.int8)
    s = torch.empty((rows.shape[0], 1), dtype=torch.float32)
    if rows.numel():
        kernels._c.quantize(rows.data_ptr(), rows.shape[0], rows.shape[1], g.data_ptr(), float(eps), q.data_ptr(),
                    s.data_ptr())
    return q, s


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.max(dim=-1).indices (first largest, or first NaN) of float32 [B, V] logits, int64 [B].

    In C when the extension is built and the logits are a contiguous CPU float32 matrix: threads
    scan the columns that a fused decode step's lm_head gave them, so each reads logits still in
    its own cache, where torch's reduction reads half of them from the other core.
    """
    if (kernels._c is None or logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu"
            or not logits.is_contiguous() or logits.shape[1] == 0):
        return logits.max(dim=-1).indices
    out = torch.empty(logits.shape[0], dtype=torch.long)
    if logits.shape[0]:
        # Below a million logits one thread scans them in microseconds, and a parallel region
        # would wait, once per token, for a second thread that a busy machine may have descheduled.
        threads = kernels.num_threads() if logits.numel() >= kernels.ARGMAX_PARALLEL_FROM else 1
        kernels._c.argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(), threads)
    return out
