"""Where a bitnet model's matrices come from. Three stored forms, told apart by their tensors:

* memwise packed (`memwise convert`): safetensors metadata format=memwise-ternary; read as written.
* latent (microsoft/bitnet-b1.58-2B-4T-bf16, or transformers' save_pretrained of a BitNetForCausalLM):
  float `NAME.weight` matrices, quantized once while loading (memwise.models.ternary.ternarize).
* transformers packed (microsoft/bitnet-b1.58-2B-4T, quantization_mode "offline"): `NAME.weight` uint8
  [ceil(N / 4), K] and `NAME.weight_scale` [1]. Byte (r, k) holds the codes t + 1 of rows r, r + R,
  r + 2R and r + 3R (R = ceil(N / 4)) of column k in bits 0-1, 2-3, 4-5 and 6-7 (transformers'
  integrations/bitnet.py pack_weights / unpack_weights); AutoBitLinear multiplies its output by
  weight_scale, so weight_scale is the matrix's scale m. Repacked here into memwise's layout.
"""
from __future__ import annotations

import math

import torch

from memwise.checkpoint import CheckpointReader
from memwise.errors import CheckpointError
from memwise.kernels.packed import TernaryMatrix, pack_ternary, padded_cols
from memwise.models.ternary.packed_format import is_packed
from memwise.models.ternary.weights import CHUNK_ELEMENTS, LatentCheckpoint, PackedCheckpoint, WeightSource

SCALE_SUFFIX = "_scale"         # transformers' NAME.weight_scale
ROW_GROUPS = 4                  # rows per stored byte


class TransformersPacked(WeightSource):
    """A checkpoint in transformers' offline packed BitNet form (see the module docstring)."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def check_matrix(self, name: str, rows: int, cols: int) -> None:
        entry = self.reader.entry(name)
        want = (-(-rows // ROW_GROUPS), cols)
        if entry.dtype != torch.uint8 or entry.shape != want:
            raise CheckpointError(f"{entry.file}: tensor '{name}' is {str(entry.dtype).removeprefix('torch.')} "
                                  f"{list(entry.shape)}, expected transformers' packed codes uint8 {list(want)}")
        scale = self.reader.entry(name + SCALE_SUFFIX)
        if scale.shape not in ((1,), ()) or not scale.dtype.is_floating_point:
            raise CheckpointError(f"{scale.file}: tensor '{name}{SCALE_SUFFIX}' is "
                                  f"{str(scale.dtype).removeprefix('torch.')} {list(scale.shape)}, expected one float")

    def matrix(self, name: str, cols: int, out: torch.Tensor | None, rows: int | None = None) -> TernaryMatrix:
        rows = out.shape[0] if out is not None else rows
        self.check_matrix(name, rows, cols)
        stored = self.reader.read(name)
        scale = float(self.reader.read(name + SCALE_SUFFIX).float().reshape(()))
        if not (math.isfinite(scale) and scale > 0):
            raise CheckpointError(f"{self.reader.directory}: tensor '{name}{SCALE_SUFFIX}' is {scale}, expected a "
                                  "positive finite scale")
        packed = out if out is not None else torch.empty((rows, padded_cols(cols) // 4), dtype=torch.uint8)
        group = stored.shape[0]
        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        for r in range(0, group, step):
            chunk = stored[r:r + step]
            for i in range(ROW_GROUPS):
                first = i * group + r
                count = min(chunk.shape[0], rows - first)
                if count <= 0:
                    break
                codes = (chunk[:count] >> (2 * i)) & 3
                if bool((codes == 3).any()):
                    raise CheckpointError(f"{self.reader.directory}: tensor '{name}' holds the invalid 2-bit "
                                          "code 3 (codes are t + 1 for t in -1, 0, 1)")
                packed[first:first + count] = pack_ternary(codes.to(torch.int8) - 1)
        return TernaryMatrix(packed, scale, rows, cols)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.reader.read(name, shape)


def is_transformers_packed(reader: CheckpointReader) -> bool:
    return any(name.endswith(".weight" + SCALE_SUFFIX) for name in reader.names())


def weight_source(reader: CheckpointReader) -> WeightSource:
    """The checkpoint's matrices as packed codes, whichever of the three forms it is in."""
    if is_packed(reader):
        return PackedCheckpoint(reader)
    if is_transformers_packed(reader):
        return TransformersPacked(reader)
    return LatentCheckpoint(reader)
