"""4-bit weights (scheme "int4", W4A8): the format, its plain PyTorch reference, and the C products.

Format (FlexGen-style group-wise asymmetric quantization; what the kernels and the model share):

* A matrix of N rows (outputs) and K columns (inputs) is cut along K into groups of GROUP = 64
  columns; Kp = K rounded up to a multiple of 64, G = Kp / 64 groups per row.
* Per group: lo = min, hi = max of its real weights (the padding is left out), scale = (hi - lo) / 15
  and zero = lo (float32); code = clamp(round((w - zero) / scale), 0, 15), rounded half to even
  (a constant group has scale 0 and codes 0). A weight dequantizes to code * scale + zero.
* Padding (K not a multiple of 64): the codes of the padded columns are 0, and the activations are
  padded with zeros, so the padding adds nothing to either sum below.
* `codes` uint8 [N, Kp / 2]: group g of a row occupies bytes [32 g, 32 g + 32); byte j of it holds
  column 64 g + j in its low nibble and column 64 g + 32 + j in its high nibble, so that one
  32-byte load gives the group's 64 codes as two in-order halves (low nibbles, then high).
* `params` float32 [N, G, 2]: (scale, zero) of each group, side by side so that a group's
  constants are one 8-byte read. Bytes held: N * Kp / 2 + 8 * N * G (0.625 B per weight).

Product (W4A8). Activations are quantized per token as the int8 scheme does (int8.quantize_tokens:
q int8, s float32 with x ~ q / s). Per token m, row n and group g, in int32:
idot = sum_k q[k] * code[n, k] and qsum = sum_k q[k] over the group. Then, in float32 and in this
order: t_g = scale[n, g] * float(idot) + zero[n, g] * float(qsum); acc = t_0 + t_1 + ... + t_{G-1}
(left to right); out = acc * (1 / s[m]) (+ bias). The integer parts are exact everywhere, and the C
paths do the float operations one by one in the same order (no fused multiply-add), so
`int4_linear` equals `int4_linear_reference` bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from memwise.kernels import KernelInputError, isa_id, isa_paths, num_threads, resolve_isa
from memwise.kernels.int8 import quantize_tokens_reference

try:
    from memwise.kernels import _fourbit as _c
except ImportError:  # no compiler at install time: the reference runs
    _c = None

GROUP = 64
MAX_COLS = 1 << 17

__all__ = ["GROUP", "Int4Matrix", "quantize_weight", "pack_codes", "unpack_codes", "int4_group_dots",
           "int4_group_dots_reference", "int4_linear", "int4_linear_reference", "linear_kernel", "padded_cols"]


def padded_cols(cols: int) -> int:
    return -(-cols // GROUP) * GROUP


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (codes uint8 [N, Kp] in 0..15, zero-padded; params float32 [N, G, 2] (scale, zero))."""
    w = w.float()
    rows, cols = w.shape
    pad = padded_cols(cols) - cols
    lo = torch.nn.functional.pad(w, (0, pad), value=float("inf")).view(rows, -1, GROUP).amin(dim=-1)
    hi = torch.nn.functional.pad(w, (0, pad), value=float("-inf")).view(rows, -1, GROUP).amax(dim=-1)
    scale = (hi - lo) / 15.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    grouped = torch.nn.functional.pad(w, (0, pad)).view(rows, -1, GROUP)
    codes = torch.round((grouped - lo[..., None]) / safe[..., None]).clamp_(0, 15)
    codes = torch.where(scale[..., None] > 0, codes, torch.zeros_like(codes)).to(torch.uint8).view(rows, -1)
    codes[:, cols:] = 0
    return codes, torch.stack([scale, lo], dim=-1).contiguous()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, Kp] (0..15) -> the packed layout above, uint8 [N, Kp / 2]."""
    grouped = codes.view(codes.shape[0], -1, GROUP)
    return (grouped[..., :GROUP // 2] | (grouped[..., GROUP // 2:] << 4)).reshape(codes.shape[0], -1).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_codes: uint8 [N, Kp / 2] -> codes uint8 [N, Kp]."""
    grouped = packed.view(packed.shape[0], -1, GROUP // 2)
    return torch.cat([grouped & 15, grouped >> 4], dim=-1).reshape(packed.shape[0], -1)


@dataclass
class Int4Matrix:
    """A 4-bit weight matrix [rows, cols] in the layout above."""

    codes: torch.Tensor       # uint8 [rows, padded_cols(cols) / 2]
    params: torch.Tensor      # float32 [rows, groups, 2]: (scale, zero)
    rows: int
    cols: int

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int4Matrix":
        codes, params = quantize_weight(w)
        return cls(pack_codes(codes), params, w.shape[0], w.shape[1])

    @property
    def groups(self) -> int:
        return padded_cols(self.cols) // GROUP

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.params.numel()

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]: code * scale + zero."""
        codes = unpack_codes(self.codes).view(self.rows, -1, GROUP).float()
        w = codes * self.params[..., :1] + self.params[..., 1:]
        return w.reshape(self.rows, -1)[:, :self.cols]


def _grouped_tokens(q: torch.Tensor, groups: int) -> torch.Tensor:
    """int8 [M, K] -> int32 [M, G, 64], zero-padded."""
    pad = groups * GROUP - q.shape[1]
    return torch.nn.functional.pad(q.to(torch.int32), (0, pad)).view(q.shape[0], groups, GROUP)


def int4_group_dots_reference(q: torch.Tensor, weight: Int4Matrix) -> torch.Tensor:
    """Exact per-group int32 dots [M, N, G]: sum over each group of q[m, k] * code[n, k]."""
    qg = _grouped_tokens(q, weight.groups)
    codes = unpack_codes(weight.codes).to(torch.int32).view(weight.rows, weight.groups, GROUP)
    return (qg.permute(1, 0, 2) @ codes.permute(1, 2, 0)).permute(1, 2, 0).contiguous()


def int4_linear_reference(x: torch.Tensor, weight: Int4Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float -> float32 [..., N] in the documented order of operations."""
    rows = x.reshape(-1, x.shape[-1])
    q, s = quantize_tokens_reference(rows)
    idot = int4_group_dots_reference(q, weight).float()
    qsum = _grouped_tokens(q, weight.groups).sum(dim=-1).float()           # [M, G]
    t = weight.params[None, :, :, 0] * idot + weight.params[None, :, :, 1] * qsum[:, None, :]
    acc = t[..., 0].clone()
    for g in range(1, weight.groups):
        acc = acc + t[..., g]
    out = acc * (1.0 / s)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.rows)


# --------------------------------------------------------------------------------------------
# Checks and the C paths


def _check_matrix(weight: Int4Matrix, device: torch.device) -> None:
    if not isinstance(weight, Int4Matrix):
        raise KernelInputError(f"weight must be an Int4Matrix, got {type(weight).__name__}")
    if weight.cols < 1 or weight.rows < 1 or weight.cols >= MAX_COLS:
        raise KernelInputError(f"int4 matrix must be non-empty with K < {MAX_COLS}, got {weight.rows}x{weight.cols}")
    want = (weight.rows, padded_cols(weight.cols) // 2)
    c = weight.codes
    if c.dtype != torch.uint8 or tuple(c.shape) != want or not c.is_contiguous():
        raise KernelInputError(f"int4 codes of a {weight.rows}x{weight.cols} matrix must be contiguous uint8 "
                               f"{list(want)}, got {c.dtype} {list(c.shape)}")
    p, want_p = weight.params, (weight.rows, weight.groups, 2)
    if p.dtype != torch.float32 or tuple(p.shape) != want_p or not p.is_contiguous():
        raise KernelInputError(f"int4 params must be contiguous float32 {list(want_p)}, got {p.dtype} {list(p.shape)}")
    if c.device != device:
        raise KernelInputError(f"int4 weights are on {c.device}, activations on {device}")


def _use_c(device: torch.device) -> bool:
    return _c is not None and device.type == "cpu"


def int4_group_dots(q: torch.Tensor, weight: Int4Matrix, isa: str | None = None) -> torch.Tensor:
    """The integer half of int4_linear on the path `isa`: int32 [M, N, G] per-group dots."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise KernelInputError(f"activations must be a 2-d int8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    _check_matrix(weight, q.device)
    if q.shape[1] != weight.cols:
        raise KernelInputError(f"activations have K={q.shape[1]} columns, the int4 matrix expects {weight.cols}")
    name = resolve_isa(isa)
    if not _use_c(q.device):
        return int4_group_dots_reference(q, weight)
    out = torch.empty((q.shape[0], weight.rows, weight.groups), dtype=torch.int32)
    if q.shape[0]:
        q = q.contiguous()
        _c.int4_dots(isa_id(name), weight.codes.data_ptr(), weight.rows, padded_cols(weight.cols), q.data_ptr(),
                     q.shape[0], q.shape[1], out.data_ptr(), num_threads())
    return out


def _check_bias(bias: torch.Tensor | None, weight: Int4Matrix) -> None:
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (weight.rows,)
                             or not bias.is_contiguous()):
        raise KernelInputError(f"int4 linear bias must be float32 [{weight.rows}], got {bias.dtype} {list(bias.shape)}")


def _linear_c(x: torch.Tensor, weight: Int4Matrix, pointers: tuple[int, int, int], name: str,
              threads: int | None) -> torch.Tensor:
    """int4_linear's C path on the path `name`, after its checks; pointers: codes, params, bias (0: none)."""
    rows = x.reshape(-1, weight.cols)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.float().contiguous()
    out = torch.empty((rows.shape[0], weight.rows), dtype=torch.float32)
    if rows.shape[0]:
        _c.int4_linear(isa_id(name), *pointers, weight.rows, padded_cols(weight.cols), rows.data_ptr(),
                       rows.shape[0], weight.cols, out.data_ptr(), threads or num_threads())
    return out.reshape(*x.shape[:-1], weight.rows)


def _pointers(weight: Int4Matrix, bias: torch.Tensor | None) -> tuple[int, int, int]:
    return weight.codes.data_ptr(), weight.params.data_ptr(), 0 if bias is None else bias.data_ptr()


def int4_linear(x: torch.Tensor, weight: Int4Matrix, bias: torch.Tensor | None = None,
                isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """y = x W^T + b with W in 4 bits and x quantized per token: x [..., K] float -> float32 [..., N], on
    `threads` threads (default: torch's count)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != weight.cols:
        raise KernelInputError(f"int4 linear input must be a float tensor [..., {weight.cols}], got "
                               f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    _check_matrix(weight, x.device)
    _check_bias(bias, weight)
    if not _use_c(x.device):
        return int4_linear_reference(x, weight, bias)
    return _linear_c(x, weight, _pointers(weight, bias), resolve_isa(isa) if isa else isa_paths()[0], threads)


def linear_kernel(weight: Int4Matrix, bias: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """int4_linear with the checks of weight and bias done once, here: the returned f(x, threads=None)
    equals int4_linear(x, weight, bias, threads=threads) (see int8.linear_kernel for why)."""
    device = weight.codes.device
    _check_matrix(weight, device)
    _check_bias(bias, weight)
    pointers, on_cpu = _pointers(weight, bias), device.type == "cpu"

    def run(x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        if (_c is None or not on_cpu or x.device != device or not x.is_floating_point() or x.dim() < 1
                or x.shape[-1] != weight.cols):
            return int4_linear(x, weight, bias, threads=threads)
        return _linear_c(x, weight, pointers, isa_paths()[0], threads)
    return run
