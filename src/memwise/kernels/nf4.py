"""NF4 weights (scheme "nf4"): bitsandbytes' NormalFloat4 with double quantization, its PyTorch
reference, and the C product.

Format: the codes and constants of `bitsandbytes.functional.quantize_4bit(W, blocksize=64,
compress_statistics=True, quant_type="nf4")` on the float32 matrix W [N, Kp], where Kp = K rounded
up to a multiple of 64 with zero columns (so that no block crosses a row; for K a multiple of 64 this
is W itself). Written here from the algorithm, checked against bitsandbytes in tests/test_nf4.py:

* Blocks of 64 along the flattened matrix: absmax_b = max |w| over the block; each weight is scaled
  to clamp(w * (1 / max(absmax_b, 1e-38)), -1, 1) and takes the index of the nearest of the 16
  NF4 values (ties to the lower index: `torch.bucketize` against the midpoints).
* `codes` uint8 [N, Kp / 2]: two codes a byte, the even element in the high nibble.
* Double quantization: offset = mean(absmax) (float32); absmax_b - offset is quantized to 8 bits in
  blocks of 256 with bitsandbytes' dynamic map (`dynamic_map()`): per block absmax2 = max |d|, and
  d * (1 / absmax2) takes its index through bitsandbytes' CPU lookup table of 65536 points
  (`_quantize_8bit`; nearly, not exactly, the nearest entry). `qabs` uint8 [N * Kp / 64],
  `absmax2` float32 [ceil(N * Kp / 64 / 256)], `offset` float32.
* Dequantized: absmax_b = code8[qabs_b] * absmax2[b // 256] + offset, w = NF4[code] * absmax_b, all
  float32 one operation at a time: what bitsandbytes' `dequantize_4bit` returns, bit for bit.
  Bytes held: N * Kp / 2 + N * Kp / 64 + 4 * ceil(N * Kp / 16384) + 4 (about 0.516 B per weight).

Product: y = x W^T (+ b) with float32 x and the weights dequantized in registers (C: a 16-entry
table lookup and one multiply per weight); float sums are in each path's own order, so the C paths
agree with `nf4_linear_reference` to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memwise.kernels import KernelInputError, isa_id, isa_paths, num_threads, resolve_isa
from memwise.kernels.linear_checks import check_bias, check_input, float32_rows

try:
    from memwise.kernels import _fourbit as _c
except ImportError:  # no compiler at install time: the reference runs
    _c = None

BLOCK = 64
BLOCK2 = 256
MAX_COLS = 1 << 22

# The 16 NormalFloat4 values (QLoRA, Dettmers et al. 2023; the table bitsandbytes uses).
NF4_VALUES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)

__all__ = ["BLOCK", "NF4_VALUES", "Nf4Matrix", "dynamic_map", "quantize_weight", "nf4_linear",
           "nf4_linear_reference", "padded_cols"]


def padded_cols(cols: int) -> int:
    return -(-cols // BLOCK) * BLOCK


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 sorted float32 values): 7 decades, decade i holding
    the 2**i midpoints of an even split of [0.1, 1] times 10**(i - 6), both signs, then 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        for v in (10.0 ** (i - 6) * ((edges[:-1] + edges[1:]) / 2.0)).tolist():
            values += [v, -v]
    return torch.tensor(sorted(values), dtype=torch.float32)


CODE8 = dynamic_map()
_NF4_MIDPOINTS = (NF4_VALUES[:-1] + NF4_VALUES[1:]) / 2


LUT_SIZE = 65536


def _code8_lut() -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer does not search the map: it cuts [-1, 1] into 65536 points
    v_i = -1 + 2 i / 65535 and gives each the map index of the first midpoint at or above it."""
    points = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    midpoints = 0.5 * (CODE8[:-1] + CODE8[1:])
    return torch.searchsorted(midpoints, points, side="left").to(torch.uint8)


_CODE8_LUT = _code8_lut()


def _quantize_8bit(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise (256) dynamic 8-bit quantization of a float32 vector, as bitsandbytes' CPU code does it:
    v = d * (1 / absmax2), then the lookup point trunc(((clamp(v, -1, 1) + 1) * 0.5) * 65535 + 0.5)."""
    n = d.numel()
    blocks = torch.nn.functional.pad(d, (0, -n % BLOCK2)).view(-1, BLOCK2)
    absmax2 = blocks.abs().amax(dim=-1)
    v = (blocks * (1.0 / absmax2)[:, None]).clamp(-1.0, 1.0)
    point = (((v + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = torch.where(absmax2[:, None] > 0, _CODE8_LUT[point.clamp(0, LUT_SIZE - 1)], 0)
    return codes.reshape(-1)[:n].to(torch.uint8).contiguous(), absmax2


CHUNK_WEIGHTS = 1 << 20   # weights quantized at a time (whole rows): float temporaries stay ~4 MiB


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [N, K] -> (codes uint8 [N, Kp / 2], qabs uint8 [N * Kp / 64], absmax2 float32, offset float32 []).

    Rows are coded a chunk at a time (a block never crosses a row, so a block's code does not depend
    on the chunk); only the block absmax of the whole matrix is kept for the double quantization, so
    the float temporaries are those of one chunk, not of the matrix (the same codes and constants)."""
    rows, kp = w.shape[0], padded_cols(w.shape[1])
    codes = torch.empty((rows, kp // 2), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(rows * kp // BLOCK, dtype=torch.float32, device=w.device)
    step = max(1, CHUNK_WEIGHTS // kp)
    for at in range(0, rows, step):
        chunk = torch.nn.functional.pad(w[at:at + step].float(), (0, kp - w.shape[1]))
        blocks = chunk.reshape(-1, BLOCK)
        block_max = blocks.abs().amax(dim=-1)
        absmax[at * kp // BLOCK:at * kp // BLOCK + block_max.numel()] = block_max
        scaled = torch.clamp(blocks * (1.0 / block_max.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
        q = torch.bucketize(scaled, _NF4_MIDPOINTS, out_int32=True).to(torch.uint8)
        codes[at:at + chunk.shape[0]] = ((q[::2] << 4) | q[1::2]).view(chunk.shape[0], -1)
    offset = absmax.mean()
    qabs, absmax2 = _quantize_8bit(absmax - offset)
    return codes, qabs, absmax2, offset


@dataclass
class Nf4Matrix:
    """An NF4 weight matrix [rows, cols] in the layout above."""

    codes: torch.Tensor     # uint8 [rows, padded_cols(cols) / 2]
    qabs: torch.Tensor      # uint8 [rows * padded_cols(cols) / 64]
    absmax2: torch.Tensor   # float32 [ceil(blocks / 256)]
    offset: torch.Tensor    # float32 [] (or [1])
    rows: int
    cols: int

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Nf4Matrix":
        return cls(*quantize_weight(w), w.shape[0], w.shape[1])

    @property
    def blocks(self) -> int:
        return self.rows * padded_cols(self.cols) // BLOCK

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.qabs.numel() + 4 * self.absmax2.numel() + 4

    def absmax(self) -> torch.Tensor:
        """float32 [blocks]: the dequantized block absmax (code8[qabs] * absmax2 + offset)."""
        scaled = CODE8[self.qabs.long()] * self.absmax2.repeat_interleave(BLOCK2)[:self.blocks]
        return scaled + self.offset.reshape(())

    def dequantize(self, padded: bool = False) -> torch.Tensor:
        """float32 [rows, cols] (or [rows, Kp] with padded=True): NF4[code] * absmax of its block."""
        q = torch.stack([self.codes >> 4, self.codes & 15], dim=-1).reshape(-1, BLOCK).long()
        w = (NF4_VALUES[q] * self.absmax()[:, None]).view(self.rows, -1)
        return w if padded else w[:, :self.cols]


def nf4_linear_reference(x: torch.Tensor, weight: Nf4Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float -> float32 [..., N]: the dequantized matrix, then a float32 matmul."""
    out = x.reshape(-1, x.shape[-1]).float() @ weight.dequantize().T
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.rows)


def _check_matrix(weight: Nf4Matrix, device: torch.device) -> None:
    if not isinstance(weight, Nf4Matrix):
        raise KernelInputError(f"weight must be an Nf4Matrix, got {type(weight).__name__}")
    if weight.cols < 1 or weight.rows < 1 or weight.cols >= MAX_COLS:
        raise KernelInputError(f"nf4 matrix must be non-empty with K < {MAX_COLS}, got {weight.rows}x{weight.cols}")
    want = {"codes": ((weight.rows, padded_cols(weight.cols) // 2), torch.uint8),
            "qabs": ((weight.blocks,), torch.uint8), "absmax2": ((-(-weight.blocks // BLOCK2),), torch.float32)}
    for name, (shape, dtype) in want.items():
        t = getattr(weight, name)
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise KernelInputError(f"nf4 {name} of a {weight.rows}x{weight.cols} matrix must be contiguous "
                                   f"{str(dtype).removeprefix('torch.')} {list(shape)}, got {t.dtype} {list(t.shape)}")
    if weight.codes.device != device:
        raise KernelInputError(f"nf4 weights are on {weight.codes.device}, activations on {device}")


def nf4_linear(x: torch.Tensor, weight: Nf4Matrix, bias: torch.Tensor | None = None,
               isa: str | None = None) -> torch.Tensor:
    """y = x W^T + b with W in NF4: x [..., K] float -> float32 [..., N]."""
    check_input(x, weight.cols, "nf4")
    _check_matrix(weight, x.device)
    check_bias(bias, weight.rows, "nf4")
    if _c is None or x.device.type != "cpu":
        return nf4_linear_reference(x, weight, bias)
    name = resolve_isa(isa) if isa else isa_paths()[0]
    rows = float32_rows(x, weight.cols)
    out = torch.empty((rows.shape[0], weight.rows), dtype=torch.float32)
    if rows.shape[0]:
        _c.nf4_linear(isa_id(name), weight.codes.data_ptr(), weight.qabs.data_ptr(), weight.absmax2.data_ptr(),
                      CODE8.data_ptr(), float(weight.offset), 0 if bias is None else bias.data_ptr(), weight.rows,
                      padded_cols(weight.cols), rows.data_ptr(), rows.shape[0], weight.cols, out.data_ptr(),
                      num_threads())
    return out.reshape(*x.shape[:-1], weight.rows)
