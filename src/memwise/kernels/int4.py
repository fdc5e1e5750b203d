"""4-bit weights (scheme "int4", W4A8): the format, its plain PyTorch reference, and the C products.

Format (FlexGen-style group-wise asymmetric quantization; what the kernels and the model share):

* A matrix of N rows (outputs) and K columns (inputs) is cut along K into groups of GROUP = 64
  columns; Kp = K rounded up to a multiple of 64, G = Kp / 64 groups per row.
* Per group: lo = min, hi = max of its real weights (the padding is left out). The constants are
  float16, rounded before the codes are chosen, because what the model computes is code * scale16 +
  zero16: codes fitted to float32 constants and then rounded constants would add the constants'
  rounding to every weight's error. zero = lo rounded down to float16 and scale = (hi - zero) / 15
  rounded up (directed rounding, so that [zero, zero + 15 scale] still covers the group and no
  weight is clamped); code = clamp(round((w - zero) / scale), 0, 15) in float32, rounded half to
  even (a group whose min is a float16 value and whose weights are all equal has scale 0 and codes
  0, and is exact). A group whose constants do not fit float16 (|zero| or scale above 65504, or a
  non-finite weight) is an error; tiny ranges fall into float16's subnormals (scale >= 2**-24, so a
  weight is off by at most half of that step). A weight dequantizes to code * scale + zero.
* Padding (K not a multiple of 64): the codes of the padded columns are 0, and the activations are
  padded with zeros, so the padding adds nothing to either sum below.
* `codes` uint8 [N, Kp / 2]: group g of a row occupies bytes [32 g, 32 g + 32); byte j of it holds
  column 64 g + j in its low nibble and column 64 g + 32 + j in its high nibble, so that one
  32-byte load gives the group's 64 codes as two in-order halves (low nibbles, then high).
* `params` float16 [N, G, 2]: (scale, zero) of each group, side by side so that a group's
  constants are one 4-byte read. Bytes held: N * Kp / 2 + 4 * N * G (0.5625 B per weight, as
  llama.cpp's Q4_0; the float32 constants this format had before held 0.625).

Product (W4A8). Activations are quantized per token as the int8 scheme does (int8.quantize_tokens:
q int8, s float32 with x ~ q / s). Per token m, row n and group g, in int32:
idot = sum_k q[k] * code[n, k] and qsum = sum_k q[k] over the group. Then, in float32 (the float16
constants widened, which is exact) and in this order: t_g = scale[n, g] * float(idot) +
zero[n, g] * float(qsum); acc = t_0 + t_1 + ... + t_{G-1} (left to right); out = acc * (1 / s[m])
(+ bias). The integer parts are exact everywhere, and the C paths do the float operations one by
one in the same order (no fused multiply-add), so `int4_linear` equals `int4_linear_reference` bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from memwise.kernels import KernelInputError, isa_id, isa_paths, num_threads, resolve_isa
from memwise.kernels.linear_checks import check_activations, check_bias, check_input, checked_once, float32_rows
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


def _half_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 x rounded to float16 toward `direction` (-inf: down, +inf: up); one step past the
    nearest value is enough, as nearest rounding is off by at most half a step."""
    h = x.half()
    wrong = h.float() > x if direction < 0 else h.float() < x
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


def quantize_weight(w: torch.Tensor, where: str = "weight",
                    first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (codes uint8 [N, Kp] in 0..15, zero-padded; params float16 [N, G, 2] (scale, zero)).
    A group whose constants do not fit float16 is a KernelInputError naming `where` and the row
    (counted from `first_row`: a caller quantizing a matrix by row chunks)."""
    w = w.float()
    rows, cols = w.shape
    pad = padded_cols(cols) - cols
    lo = torch.nn.functional.pad(w, (0, pad), value=float("inf")).view(rows, -1, GROUP).amin(dim=-1)
    hi = torch.nn.functional.pad(w, (0, pad), value=float("-inf")).view(rows, -1, GROUP).amax(dim=-1)
    zero = _half_toward(lo, float("-inf"))
    scale = _half_toward((hi - zero.float()) / 15.0, float("inf"))
    bad = ~(torch.isfinite(zero) & torch.isfinite(scale))
    if bool(bad.any()):
        r, g = (int(i) for i in bad.nonzero()[0])
        raise KernelInputError(f"int4: {where} row {first_row + r}, columns {GROUP * g}..{min(GROUP * g + GROUP, cols) - 1}"
                               f": weights from {float(lo[r, g]):g} to {float(hi[r, g]):g} do not fit float16 group "
                               f"constants (finite, |value| <= 65504)")
    scale32, zero32 = scale.float(), zero.float()
    safe = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
    grouped = torch.nn.functional.pad(w, (0, pad)).view(rows, -1, GROUP)
    codes = torch.round((grouped - zero32[..., None]) / safe[..., None]).clamp_(0, 15)
    codes = torch.where(scale32[..., None] > 0, codes, torch.zeros_like(codes)).to(torch.uint8).view(rows, -1)
    codes[:, cols:] = 0
    return codes, torch.stack([scale, zero], dim=-1).contiguous()


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
    params: torch.Tensor      # float16 [rows, groups, 2]: (scale, zero)
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
        return self.codes.numel() + 2 * self.params.numel()

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]: code * scale + zero."""
        codes, params = unpack_codes(self.codes).view(self.rows, -1, GROUP).float(), self.params.float()
        w = codes * params[..., :1] + params[..., 1:]
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
    params = weight.params.float()                                         # exact: float16 -> float32
    t = params[None, :, :, 0] * idot + params[None, :, :, 1] * qsum[:, None, :]
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
    if p.dtype != torch.float16 or tuple(p.shape) != want_p or not p.is_contiguous():
        raise KernelInputError(f"int4 params must be contiguous float16 {list(want_p)}, got {p.dtype} {list(p.shape)}")
    if c.device != device:
        raise KernelInputError(f"int4 weights are on {c.device}, activations on {device}")


def _use_c(device: torch.device) -> bool:
    return _c is not None and device.type == "cpu"


def int4_group_dots(q: torch.Tensor, weight: Int4Matrix, isa: str | None = None) -> torch.Tensor:
    """The integer half of int4_linear on the path `isa`: int32 [M, N, G] per-group dots."""
    check_activations(q, weight, _check_matrix, "int4")
    name = resolve_isa(isa)
    if not _use_c(q.device):
        return int4_group_dots_reference(q, weight)
    out = torch.empty((q.shape[0], weight.rows, weight.groups), dtype=torch.int32)
    if q.shape[0]:
        q = q.contiguous()
        _c.int4_dots(isa_id(name), weight.codes.data_ptr(), weight.rows, padded_cols(weight.cols), q.data_ptr(),
                     q.shape[0], q.shape[1], out.data_ptr(), num_threads())
    return out


def _linear_c(x: torch.Tensor, weight: Int4Matrix, pointers: tuple[int, int, int], name: str,
              threads: int | None) -> torch.Tensor:
    """int4_linear's C path on the path `name`, after its checks; pointers: codes, params, bias (0: none)."""
    rows = float32_rows(x, weight.cols)
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
    check_input(x, weight.cols, "int4")
    _check_matrix(weight, x.device)
    check_bias(bias, weight.rows, "int4")
    if not _use_c(x.device):
        return int4_linear_reference(x, weight, bias)
    return _linear_c(x, weight, _pointers(weight, bias), resolve_isa(isa) if isa else isa_paths()[0], threads)


def linear_kernel(weight: Int4Matrix, bias: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """int4_linear with the checks of weight and bias done once, here: the returned f(x, threads=None)
    equals int4_linear(x, weight, bias, threads=threads) (see int8.linear_kernel for why)."""
    device = weight.codes.device
    _check_matrix(weight, device)
    check_bias(bias, weight.rows, "int4")
    pointers = _pointers(weight, bias)
    return checked_once(device, weight.cols, _use_c,
                        lambda x, threads: _linear_c(x, weight, pointers, isa_paths()[0], threads),
                        lambda x, threads: int4_linear(x, weight, bias, threads=threads))
