"""Where a ternary model's weights come from: a latent (released) checkpoint ternarized once while streaming,
a packed checkpoint read as it is, or random codes for synthetic presets.

Each source writes a matrix's packed codes straight into its place in the model's one buffer of
codes, so loading never holds more than one latent matrix and a few MB of temporaries.
"""
from __future__ import annotations

from typing import Callable

import torch

from memwise.checkpoint import CheckpointReader
from memwise.errors import CheckpointError
from memwise.kernels.packed import (BLOCK, BLOCK_BYTES, SCALE_FLOOR, TernaryMatrix, codes_buffer, pack_ternary,
                                   padded_cols)
from memwise.models.ternary.packed_format import PACKED_SUFFIX, SCALE_SUFFIX, TensorSlot, packed_bytes, read_packed

# Row chunks of about this many weights bound the float32 temporaries of quantization, so loading
# never holds more than the one latent tensor plus a few MB.
CHUNK_ELEMENTS = 1 << 20


def ternarize(weight: torch.Tensor, out: torch.Tensor | None = None) -> TernaryMatrix:
    """Quantize a latent matrix once and pack it: t = clamp(round(W / m), -1, 1), m = max(mean|W|, 1e-5).

    The same values as memwise.kernels.packed.quantize_latent + pack_ternary, computed over row chunks: the
    whole-matrix version holds three float32 copies of the matrix at once (1 GB for a 2.7B model's
    lm_head), which would set the peak memory of loading. mean|W| is accumulated in float64, so m is
    the float32 nearest the exact mean; W / m, round (half to even) and clamp are float32 as there.
    The codes are written into `out` (uint8 [rows, padded_cols(cols) / 4], any device) when given.
    """
    if weight.dim() != 2:
        raise ValueError(f"ternarize expects a 2-d matrix, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    total = torch.zeros((), dtype=torch.float64)
    for r in range(0, rows, step):
        # copy=True: .float() of a float32 matrix is the matrix itself, which the in-place steps would
        # overwrite (and the second pass would then quantize |W|)
        total += weight[r:r + step].to(torch.float32, copy=True).abs_().sum(dtype=torch.float64)
    m = torch.tensor(float(total) / max(weight.numel(), 1), dtype=torch.float32).clamp(min=SCALE_FLOOR)
    packed = _packed_out(out, rows, cols)
    for r in range(0, rows, step):
        t = weight[r:r + step].to(torch.float32, copy=True).div_(m).round_().clamp_(-1, 1).to(torch.int8)
        packed[r:r + step] = pack_ternary(t)
    return TernaryMatrix(packed, float(m), rows, cols)


def random_ternary(rows: int, cols: int, scale: float, generator: torch.Generator,
                   out: torch.Tensor | None = None) -> TernaryMatrix:
    """Random packed codes without any latent matrix: P(t=-1, 0, +1) = 1/4, 1/2, 1/4.

    Each 2-bit code is the sum of two random bits, so one random byte gives four codes with two masks
    and an add (no carry crosses a field: a code is at most 2).
    """
    kp = padded_cols(cols)
    packed = _packed_out(out, rows, cols)
    step = max(1, CHUNK_ELEMENTS // kp)
    for r in range(0, rows, step):
        bits = torch.randint(0, 256, (min(step, rows - r), kp // 4), dtype=torch.uint8, generator=generator)
        packed[r:r + step] = (bits & 0x55) + ((bits >> 1) & 0x55)
    tail = cols - (kp - BLOCK)
    if tail < BLOCK:
        # The last block must hold code 1 (t = 0) in its padding, as pack_ternary writes it.
        bits = torch.randint(0, 2, (2, rows, tail), dtype=torch.int8, generator=generator)
        packed[:, -BLOCK_BYTES:] = pack_ternary(bits[0] + bits[1] - 1)
    return TernaryMatrix(packed, float(scale), rows, cols)


def _packed_out(out: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
    shape = (rows, padded_cols(cols) // 4)
    if out is None:
        return torch.empty(shape, dtype=torch.uint8)
    if tuple(out.shape) != shape or out.dtype != torch.uint8:
        raise ValueError(f"output for packed codes must be uint8 {list(shape)}, got {out.dtype} {list(out.shape)}")
    return out



def allocate_codes(slots: list[TensorSlot], device: torch.device) -> tuple[torch.Tensor, dict[str, int]]:
    """One buffer for every ternary matrix's packed codes, in the order of `slots`, and each matrix's
    offset in it (matrices that follow each other in `slots` follow each other in the buffer).

    Allocated before anything else: one large allocation stays out of the C heap, so the many
    short-lived chunks of quantization cannot fragment memory around long-lived matrices (which
    raised the resident set of a 1.3B model by 0.4 GB). On Linux CPUs it is backed by huge pages."""
    offsets, at = {}, 0
    for slot in slots:
        if slot.ternary:
            offsets[slot.name] = at
            at += packed_bytes(*slot.shape)
    return codes_buffer(at, device), offsets


class WeightSource:
    """Where matrices and other tensors come from: a latent or packed checkpoint, or random values.

    `matrix` writes a matrix's packed codes into `out` (a view of the model's one buffer of codes, or
    None for a new tensor) and returns it with its scale; `tensor` returns any other tensor as stored;
    `check_matrix` checks a matrix's stored form from the header alone, before anything is read or
    written.
    """

    def matrix(self, name: str, cols: int, out: torch.Tensor | None, rows: int | None = None) -> TernaryMatrix:
        raise NotImplementedError

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def check_matrix(self, name: str, rows: int, cols: int) -> None:
        pass


def _rows(out: torch.Tensor | None, rows: int | None) -> int:
    if out is not None:
        return out.shape[0]
    if rows is None:
        raise ValueError("matrix() needs `rows` when it has no output buffer")
    return rows


class LatentCheckpoint(WeightSource):
    """Float matrices quantized once here; `latent_name` maps a matrix to the tensor that holds it
    (a tied lm_head is stored as the embedding)."""

    def __init__(self, reader: CheckpointReader, latent_name: Callable[[str], str] = lambda name: name):
        self.reader, self.latent_name = reader, latent_name

    def check_matrix(self, name: str, rows: int, cols: int) -> None:
        entry = self.reader.expect(self.latent_name(name), (rows, cols))
        if not entry.dtype.is_floating_point:
            raise CheckpointError(f"{entry.file}: tensor '{name}' is {entry.dtype}, expected a floating-point "
                                  "latent matrix")

    def matrix(self, name: str, cols: int, out: torch.Tensor | None, rows: int | None = None) -> TernaryMatrix:
        self.check_matrix(name, _rows(out, rows), cols)
        return ternarize(self.reader.read(self.latent_name(name)), out)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.reader.read(name, shape)


class PackedCheckpoint(WeightSource):
    """A memwise packed checkpoint: codes and scales read as they are."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def check_matrix(self, name: str, rows: int, cols: int) -> None:
        for suffix, shape in ((PACKED_SUFFIX, (rows, padded_cols(cols) // 4)), (SCALE_SUFFIX, ())):
            self.reader.expect(name + suffix, shape)

    def matrix(self, name: str, cols: int, out: torch.Tensor | None, rows: int | None = None) -> TernaryMatrix:
        rows = _rows(out, rows)
        packed, scale = read_packed(self.reader, name, rows, cols)
        if out is None:
            return TernaryMatrix(packed, float(scale), rows, cols)
        out.copy_(packed)
        return TernaryMatrix(out, float(scale), rows, cols)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.reader.read(name, shape)


class RandomWeights(WeightSource):
    """Random codes with scales ~0.02; the tensors named in `embeddings` normal in bf16, those in
    `zeros` zero, every other tensor (norm gains) one."""

    def __init__(self, seed: int, embeddings: tuple[str, ...], zeros: tuple[str, ...] = ()):
        self.generator = torch.Generator().manual_seed(seed)
        self.embeddings, self.zeros = embeddings, zeros

    def matrix(self, name: str, cols: int, out: torch.Tensor | None, rows: int | None = None) -> TernaryMatrix:
        scale = 0.02 * (1 + 0.1 * float(torch.rand((), generator=self.generator)))
        return random_ternary(_rows(out, rows), cols, scale, self.generator, out)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in self.embeddings:
            out = torch.empty(shape, dtype=torch.bfloat16)
            step = max(1, CHUNK_ELEMENTS // shape[1])
            for r in range(0, shape[0], step):
                out[r:r + step] = torch.randn((min(step, shape[0] - r), shape[1]), generator=self.generator)
            return out
        if name in self.zeros:
            return torch.zeros(shape)
        return torch.ones(shape)
