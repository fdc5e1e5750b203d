"""Ternary kernels: BitLinear and the int8 x ternary product (preliminary: PyTorch reference only)."""
from __future__ import annotations

import os

import torch

from memwise.errors import MemwiseError
from memwise.ternary import (TernaryMatrix, bitlinear_reference, ternary_matmul_reference)

HAVE_C = False


def isa_paths() -> list[str]:
    forced = os.environ.get("MEMWISE_ISA")
    if forced and forced != "scalar":
        raise MemwiseError(f"MEMWISE_ISA={forced!r} is not available on this machine (available: scalar)")
    return ["scalar"]


def ternary_matmul(q: torch.Tensor, weight: TernaryMatrix, isa: str | None = None) -> torch.Tensor:
    return ternary_matmul_reference(q, weight.ternary())


def bitlinear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: TernaryMatrix,
              backend: str = "auto") -> torch.Tensor:
    return bitlinear_reference(x, norm_weight, eps, weight)


def read_bandwidth_bytes_per_s() -> float:
    buf = torch.ones(1 << 28, dtype=torch.uint8)
    import time
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        buf.view(torch.int64).sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() / best
