"""Triton kernel for the 2-bit packed ternary layout of memwise.kernels.packed, for CUDA tensors.

triton is optional and never a requirement: without it AVAILABLE is False and memwise.kernels
uses the PyTorch reference on GPUs. With TRITON_INTERPRET=1 the same kernel runs on CPU tensors
(slowly), which is how the tests check it on machines without a GPU.

Each program computes a BLOCK_M x BLOCK_N tile of int32 outputs. Per 128-weight block it loads
the 32 packed bytes of each of its BLOCK_N weight rows once and unpacks them into four 32-wide
slices of ternary values (t = code - 1, int8), each multiplied with the matching 32 activations
by an int8 dot product with int32 accumulation: exact.
"""
from __future__ import annotations

import torch

from memwise.kernels.packed import BLOCK_BYTES, TernaryMatrix, quantize_activations, rmsnorm

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency
    triton = None
    tl = None

AVAILABLE: bool = triton is not None

if AVAILABLE:
    @triton.jit
    def _ternary_mm_kernel(q_ptr, w_ptr, out_ptr, M, N, K, NB, stride_qm, stride_wn, stride_om,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, 32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for b in range(0, NB):
            # Rows past N read as code 1 (t = 0); they are never stored anyway.
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + b * 32 + j[None, :],
                             mask=rn[:, None] < N, other=0x55)
            for g in tl.static_range(4):
                t = ((packed >> (2 * g)) & 3).to(tl.int8) - 1
                kk = b * 128 + g * 32 + j
                qv = tl.load(q_ptr + rm[:, None] * stride_qm + kk[None, :],
                             mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
                acc += tl.dot(qv, tl.trans(t), out_dtype=tl.int32)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc,
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def ternary_matmul(q: torch.Tensor, weight: TernaryMatrix) -> torch.Tensor:
    """Exact int8 q [M, K] x ternary weight [N, K] -> int32 [M, N], both on the same device.

    Inputs are validated by memwise.kernels.ternary_matmul.
    """
    if not AVAILABLE:
        raise RuntimeError("triton is not installed")
    q = q.contiguous()
    m, k = q.shape
    n = weight.rows
    out = torch.empty((m, n), dtype=torch.int32, device=q.device)
    if m == 0:
        return out
    block_m = 16 if m <= 16 else 64
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _ternary_mm_kernel[grid](q, weight.packed, out, m, n, k, weight.packed.shape[1] // BLOCK_BYTES,
                             q.stride(0), weight.packed.stride(0), out.stride(0),
                             BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def bitlinear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
              weight: TernaryMatrix) -> torch.Tensor:
    """BitLinear with the reference's own torch ops for RMSNorm and quantization (so the int8
    activations are exactly the reference's on that device) and the Triton product."""
    lead = x.shape[:-1]
    q, s = quantize_activations(rmsnorm(x.reshape(-1, x.shape[-1]), norm_weight, eps))
    acc = ternary_matmul(q, weight)
    return (acc.float() * (weight.scale / s)).reshape(*lead, weight.rows)
