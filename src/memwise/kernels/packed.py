"""The 2-bit packed ternary format, and the plain PyTorch reference of every kernel built on it.

Packed layout (format version 1), the one thing kernels, checkpoints and the model share:

* A matrix of N rows (outputs) and K columns (inputs) holds codes c = t + 1 in {0, 1, 2} for
  t in {-1, 0, +1}. Each row is padded with t = 0 (code 1) to Kp = K rounded up to a multiple of 128.
* A row is a run of blocks of 128 weights stored in 32 bytes. Byte j (0 <= j < 32) of a block holds
  the codes of the block's weights j, j + 32, j + 64 and j + 96 in bits 0-1, 2-3, 4-5 and 6-7.
  One 32-byte load, shifted by 0, 2, 4 and 6 and masked with 3, gives the codes of 32 consecutive
  weights in 32 consecutive bytes: SIMD unpacking is a shift and an AND, with no shuffles.
* The packed tensor is uint8 [N, Kp / 4], row-major; each matrix has one float32 scale m.

The value of weight (n, k) is t[n, k] * m. Because codes are unsigned, a kernel can multiply them
by signed int8 activations with unsigned-by-signed instructions (VPDPBUSD, PMADDUBSW) and subtract
the sum of the activations once per row: sum(c * q) - sum(q) = sum(t * q).
"""
from __future__ import annotations

import mmap
import os
import sys
from dataclasses import dataclass

import torch

from memwise.kernels.packed_layout import BLOCK, BLOCK_BYTES, FORMAT_VERSION, SCALE_FLOOR, padded_cols

__all__ = ["BLOCK", "BLOCK_BYTES", "FORMAT_VERSION", "SCALE_FLOOR", "HUGE_PAGE", "TernaryMatrix", "bitlinear_reference",
           "codes_buffer", "pack_ternary", "padded_cols", "quantize_activations", "quantize_latent", "rmsnorm",
           "ternary_matmul_reference", "unpack_ternary"]


HUGE_PAGE = 2 << 20


def codes_buffer(nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialized uint8 buffer of nbytes for a model's packed codes.

    On Linux CPUs it is anonymous memory advised for transparent huge pages (2 MB) and aligned to
    them: every decode step streams all codes, and with 4 KB pages each 4 KB costs a page walk (the
    fused steps ran measurably slower that way; docs/matmul-free.md).  Where the kernel
    refuses the advice (THP disabled) the buffer has small pages.  MEMWISE_HUGE_PAGES=0 asks for a
    plain allocation (to compare, or where huge pages are unwelcome).
    """
    device = torch.device(device)
    if (device.type != "cpu" or nbytes < HUGE_PAGE or not sys.platform.startswith("linux")
            or os.environ.get("MEMWISE_HUGE_PAGES", "1") == "0"):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # shared memory gets no THP
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]


def quantize_latent(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ternarize a latent matrix once: t = clamp(round(W / m), -1, 1), m = max(mean|W|, 1e-5), in float32."""
    w = weight.float()
    m = w.abs().mean().clamp(min=SCALE_FLOOR)
    t = (w / m).round().clamp(-1, 1).to(torch.int8)
    return t, float(m)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in {-1, 0, 1} -> uint8 [N, Kp / 4] in the layout above."""
    if t.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-d matrix, got shape {tuple(t.shape)}")
    n, k = t.shape
    kp = padded_cols(k)
    codes = torch.ones((n, kp), dtype=torch.uint8)
    codes[:, :k] = (t.to(torch.int16) + 1).to(torch.uint8)
    # [N, blocks, 4 groups of 32, 32] -> group g goes to bits 2g.
    codes = codes.view(n, kp // BLOCK, 4, BLOCK_BYTES)
    packed = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    return packed.reshape(n, kp // 4).contiguous()


def unpack_ternary(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [N, Kp / 4] -> int8 [N, cols] with values in {-1, 0, 1}."""
    n, nbytes = packed.shape
    blocks = packed.view(n, nbytes // BLOCK_BYTES, 1, BLOCK_BYTES)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    codes = (blocks >> shifts) & 3
    return (codes.reshape(n, -1)[:, :cols].to(torch.int8) - 1)


@dataclass
class TernaryMatrix:
    """A ternary weight matrix [rows, cols] stored packed, with its one scale m."""

    packed: torch.Tensor    # uint8 [rows, padded_cols(cols) / 4]
    scale: float            # m
    rows: int
    cols: int

    @classmethod
    def from_ternary(cls, t: torch.Tensor, scale: float) -> "TernaryMatrix":
        return cls(pack_ternary(t), float(scale), t.shape[0], t.shape[1])

    @classmethod
    def from_latent(cls, weight: torch.Tensor) -> "TernaryMatrix":
        t, m = quantize_latent(weight)
        return cls.from_ternary(t, m)

    def ternary(self) -> torch.Tensor:
        return unpack_ternary(self.packed, self.cols)


def quantize_activations(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 quantization: s = 127 / max(max|y|, 1e-5); q = clamp(round(y * s), -128, 127)."""
    s = 127.0 / y.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_FLOOR)
    q = (y * s).round().clamp(-128, 127).to(torch.int8)
    return q, s


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def ternary_matmul_reference(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact integer product q [M, K] int8 x t [N, K] ternary -> int32 [M, N].

    float32 is exact here: every partial sum is an integer of magnitude <= 128 * K < 2**24 for
    K < 131072, so any summation order gives the same integer.
    """
    if q.shape[-1] >= 1 << 17:
        raise ValueError("ternary_matmul_reference: K >= 131072 is not exact in float32")
    return (q.float() @ t.float().T).to(torch.int32)


def bitlinear_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: TernaryMatrix, t: torch.Tensor | None = None) -> torch.Tensor:
    """BitLinear in plain PyTorch: rmsnorm * g, int8 activations, ternary product, one rescale per row."""
    shape = x.shape[:-1]
    y = rmsnorm(x.reshape(-1, x.shape[-1]), norm_weight, eps)
    q, s = quantize_activations(y)
    acc = ternary_matmul_reference(q, weight.ternary() if t is None else t)
    return (acc.float() * (weight.scale / s)).reshape(*shape, weight.rows)
