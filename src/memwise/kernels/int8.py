"""int8 weights (scheme "int8", W8A8): the format, its plain PyTorch reference, and the C products.

Format (what the kernels, the model and `weights_bytes()` share):

* A matrix of N rows (outputs) and K columns (inputs) is stored as int8 `weight` [N, Kp], row-major,
  Kp = K rounded up to a multiple of ALIGN = 64 (one AVX-512 register), the padding zero.
* Symmetric per output row: scale[n] = max|W[n]| / 127 (float32; 0 for an all-zero row), and
  weight[n, k] = clamp(round(W[n, k] / scale[n]), -127, 127), rounded half to even (torch.round).
  -128 is never used, so the AVX2 path can move signs onto weights (csrc/int8_products.h).
* row_sums[n] = sum_k weight[n, k] (int32), computed once: the AVX-512 VNNI path multiplies
  activations shifted to unsigned (q + 128) and subtracts 128 * row_sums[n].
* Bytes held: N * Kp + 8 * N (`Int8Matrix.nbytes`).

Activations are quantized per token (row) on the fly, as the ternary path does without its norm:
s = 127 / max(max|x|, 1e-5), computed as (1 / amax) * 127 in float32, q = clamp(round(x * s), -128,
127) half to even. The product is exact in int32: acc = q @ weight^T. Then
out = (acc * scale[n]) * (1 / s[m]) (+ bias), in float32.

Exactness: `int8_matmul` is bit-exact to `int8_matmul_reference` on every path; `quantize_tokens`
matches `quantize_tokens_reference` bit for bit (the same IEEE operations in the same order);
`int8_linear`'s float rescale agrees with `int8_linear_reference` to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from memwise.kernels import KernelInputError, isa_id, isa_paths, num_threads, resolve_isa
from memwise.kernels.linear_checks import check_activations, check_bias, check_input, checked_once, float32_rows
from memwise.kernels.packed import SCALE_FLOOR

try:
    from memwise.kernels import _int8 as _c
except ImportError:  # no compiler at install time: the reference runs
    _c = None

ALIGN = 64
MAX_COLS = 1 << 17  # |acc| <= 128 * 127 * K stays inside int32 below this K

__all__ = ["ALIGN", "Int8Matrix", "quantize_weight", "quantize_tokens", "quantize_tokens_reference",
           "int8_matmul", "int8_matmul_reference", "int8_linear", "int8_linear_reference", "linear_kernel",
           "padded_cols"]


def padded_cols(cols: int) -> int:
    return -(-cols // ALIGN) * ALIGN


@dataclass
class Int8Matrix:
    """An int8 weight matrix [rows, cols] in the layout above (weight padded to padded_cols(cols))."""

    weight: torch.Tensor      # int8 [rows, padded_cols(cols)]
    scale: torch.Tensor       # float32 [rows]
    row_sums: torch.Tensor    # int32 [rows]
    rows: int
    cols: int

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Matrix":
        q, scale = quantize_weight(w)
        return cls.from_int8(q, scale)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor) -> "Int8Matrix":
        """From int8 [N, K] values in [-127, 127] and float32 scales [N]."""
        if q.dtype != torch.int8 or q.dim() != 2:
            raise KernelInputError(f"int8 weights must be a 2-d int8 tensor, got {q.dtype} {list(q.shape)}")
        if q.numel() and int(q.min()) == -128:
            raise KernelInputError("int8 weights must lie in [-127, 127]; -128 is not used by this format")
        rows, cols = q.shape
        weight = torch.zeros((rows, padded_cols(cols)), dtype=torch.int8, device=q.device)
        weight[:, :cols] = q
        return cls(weight, scale.float().reshape(rows).contiguous(), q.sum(dim=1, dtype=torch.int32), rows, cols)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + 4 * self.scale.numel() + 4 * self.row_sums.numel()

    def values(self) -> torch.Tensor:
        """The int8 values [rows, cols] without the padding."""
        return self.weight[:, :self.cols]


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K] in [-127, 127], float32 scale [N]), symmetric per row, in float32."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_tokens_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, K] -> (int8 q [M, K], float32 s [M, 1]) as the C kernels compute them."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_FLOOR)
    s = (1.0 / amax) * 127.0
    return torch.round(x * s).clamp_(-128, 127).to(torch.int8), s


def int8_matmul_reference(q: torch.Tensor, weight: Int8Matrix) -> torch.Tensor:
    """Exact int8 q [M, K] x int8 W [N, K] -> int32 [M, N] (an int32 matmul: |acc| < 2**31 for K < 2**17)."""
    return q.to(torch.int32) @ weight.values().to(torch.int32).T


def int8_linear_reference(x: torch.Tensor, weight: Int8Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float -> float32 [..., N]: per-token int8, exact product, one rescale per output."""
    rows = x.reshape(-1, x.shape[-1])
    q, s = quantize_tokens_reference(rows)
    out = (int8_matmul_reference(q, weight).float() * weight.scale) * (1.0 / s)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.rows)


# --------------------------------------------------------------------------------------------
# Checks and the C paths


def _check_matrix(weight: Int8Matrix, device: torch.device) -> None:
    if not isinstance(weight, Int8Matrix):
        raise KernelInputError(f"weight must be an Int8Matrix, got {type(weight).__name__}")
    w, want = weight.weight, (weight.rows, padded_cols(weight.cols))
    if w.dtype != torch.int8 or tuple(w.shape) != want or not w.is_contiguous():
        raise KernelInputError(f"int8 weights of a {weight.rows}x{weight.cols} matrix must be contiguous int8 "
                               f"{list(want)}, got {w.dtype} {list(w.shape)}")
    if weight.scale.dtype != torch.float32 or tuple(weight.scale.shape) != (weight.rows,):
        raise KernelInputError(f"int8 scales must be float32 [{weight.rows}], got {weight.scale.dtype} "
                               f"{list(weight.scale.shape)}")
    if weight.row_sums.dtype != torch.int32 or tuple(weight.row_sums.shape) != (weight.rows,):
        raise KernelInputError(f"int8 row sums must be int32 [{weight.rows}]")
    if weight.cols < 1 or weight.rows < 1 or weight.cols >= MAX_COLS:
        raise KernelInputError(f"int8 matrix must be non-empty with K < {MAX_COLS}, got {weight.rows}x{weight.cols}")
    if w.device != device:
        raise KernelInputError(f"int8 weights are on {w.device}, activations on {device}")


def _use_c(device: torch.device) -> bool:
    return _c is not None and device.type == "cpu"


def int8_matmul(q: torch.Tensor, weight: Int8Matrix, isa: str | None = None) -> torch.Tensor:
    """Exact q [M, K] int8 x W [N, K] int8 -> int32 [M, N] on the path `isa` (default: the best)."""
    check_activations(q, weight, _check_matrix, "int8")
    name = resolve_isa(isa)
    if not _use_c(q.device):
        return int8_matmul_reference(q, weight)
    out = torch.empty((q.shape[0], weight.rows), dtype=torch.int32)
    if q.shape[0]:
        q = q.contiguous()
        _c.matmul(isa_id(name), weight.weight.data_ptr(), weight.row_sums.data_ptr(), weight.rows,
                  weight.weight.shape[1], q.data_ptr(), q.shape[0], q.shape[1], out.data_ptr(), num_threads())
    return out


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation half of int8_linear: (q int8 [M, K], s float32 [M, 1]) for float x [M, K]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise KernelInputError(f"quantize_tokens expects a 2-d float tensor, got {list(getattr(x, 'shape', []))}")
    if not _use_c(x.device):
        return quantize_tokens_reference(x)
    rows = x.float().contiguous()
    q = torch.empty(rows.shape, dtype=torch.int8)
    s = torch.empty((rows.shape[0], 1), dtype=torch.float32)
    if rows.numel():
        _c.quantize(rows.data_ptr(), rows.shape[0], rows.shape[1], q.data_ptr(), s.data_ptr())
    return q, s


def _linear_c(x: torch.Tensor, weight: Int8Matrix, pointers: tuple[int, int, int, int],
              threads: int | None) -> torch.Tensor:
    """int8_linear's C path, after its checks; pointers: weight, row sums, scales, bias (0: none)."""
    rows = float32_rows(x, weight.cols)
    out = torch.empty((rows.shape[0], weight.rows), dtype=torch.float32)
    if rows.shape[0]:
        _c.linear(isa_id(isa_paths()[0]), *pointers, weight.rows, weight.weight.shape[1], rows.data_ptr(),
                  rows.shape[0], weight.cols, out.data_ptr(), threads or num_threads())
    return out.reshape(*x.shape[:-1], weight.rows)


def _pointers(weight: Int8Matrix, bias: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (weight.weight.data_ptr(), weight.row_sums.data_ptr(), weight.scale.data_ptr(),
            0 if bias is None else bias.data_ptr())


def int8_linear(x: torch.Tensor, weight: Int8Matrix, bias: torch.Tensor | None = None,
                threads: int | None = None) -> torch.Tensor:
    """y = x W^T + b with W in int8 and x quantized per token: x [..., K] float -> float32 [..., N], on
    `threads` threads (default: torch's count)."""
    check_input(x, weight.cols, "int8")
    _check_matrix(weight, x.device)
    check_bias(bias, weight.rows, "int8")
    if not _use_c(x.device):
        return int8_linear_reference(x, weight, bias)
    return _linear_c(x, weight, _pointers(weight, bias), threads)


def linear_kernel(weight: Int8Matrix, bias: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """int8_linear with the checks of weight and bias done once, here: the returned f(x, threads=None)
    equals int8_linear(x, weight, bias, threads). A model's linear keeps one per matrix, because a
    decode step's product of a small matrix takes less time than those checks."""
    device = weight.weight.device
    _check_matrix(weight, device)
    check_bias(bias, weight.rows, "int8")
    pointers = _pointers(weight, bias)
    return checked_once(device, weight.cols, _use_c, lambda x, threads: _linear_c(x, weight, pointers, threads),
                        lambda x, threads: int8_linear(x, weight, bias, threads))
