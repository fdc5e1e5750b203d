"""The packed checkpoint that `memwise convert` writes for the ternary families: reading and checking it.

A packed checkpoint is a safetensors file with metadata {"format": "memwise-ternary",
"format_version": "1"}. Each ternary matrix NAME.weight [N, K] of the released layout is stored as
NAME.weight.packed (uint8 [N, ceil(K / 128) * 32], the codes t + 1 in the block layout of
memwise.kernels.packed) and NAME.weight.scale (float32 [], the scale m: weight = t * m); every other
tensor under its own name, as released. It is read as it is: quantizing t * m again would change m.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memwise.errors import CheckpointError
from memwise.kernels.packed_layout import BLOCK, BLOCK_BYTES, padded_cols

if TYPE_CHECKING:   # the names and sizes here serve the torch-free runtime (memwise.lite) too
    import torch

    from memwise.checkpoint import CheckpointReader

PACKED_FORMAT = "memwise-ternary"
PACKED_FORMAT_VERSION = "1"
PACKED_SUFFIX = ".packed"       # NAME.weight.packed: uint8 [rows, padded_cols(cols) / 4]
SCALE_SUFFIX = ".scale"         # NAME.weight.scale: float32, shape []



@dataclass(frozen=True)
class TensorSlot:
    """One tensor of a family's checkpoint layout: its released name and shape, and whether it is a
    ternary matrix (stored packed as NAME.packed + NAME.scale) or stored as it is."""

    name: str
    shape: tuple[int, ...]
    ternary: bool


def packed_bytes(rows: int, cols: int) -> int:
    """Bytes of the codes of a [rows, cols] ternary matrix."""
    return rows * padded_cols(cols) // 4


# Rows of codes checked at a time, bounding the temporaries of the check.
CHECK_ELEMENTS = 1 << 20


def check_packed_codes(packed: "torch.Tensor", cols: int, name: str, where: str) -> None:
    """Reject code 3 (not a ternary value) anywhere and non-zero weights in a row's padding."""
    import torch

    step = max(1, CHECK_ELEMENTS // max(packed.shape[1], 1))
    for r in range(0, packed.shape[0], step):
        chunk = packed[r:r + step]
        if bool((chunk & (chunk >> 1) & 0x55).any()):
            raise CheckpointError(f"{where}: tensor '{name}' holds the invalid 2-bit code 3 "
                                  "(codes are t + 1 for t in -1, 0, 1)")
    kp = packed.shape[1] * 4
    if cols < kp:
        last = packed[:, -BLOCK_BYTES:]
        codes = torch.stack([(last >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(packed.shape[0], BLOCK)
        if bool((codes[:, BLOCK - (kp - cols):] != 1).any()):
            raise CheckpointError(f"{where}: tensor '{name}' has non-zero weights in the padding after "
                                  f"column {cols}")


def read_packed(reader: "CheckpointReader", name: str, rows: int, cols: int) -> tuple[Any, Any]:
    """`NAME.packed` (checked codes) and `NAME.scale` of a packed checkpoint, in their stored form
    (torch tensors)."""
    import torch

    where = str(reader.directory)
    packed = reader.read(name + PACKED_SUFFIX, (rows, padded_cols(cols) // 4))
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"{where}: tensor '{name}{PACKED_SUFFIX}' is {packed.dtype}, expected uint8")
    check_packed_codes(packed, cols, name + PACKED_SUFFIX, where)
    scale = reader.read(name + SCALE_SUFFIX, ())
    if scale.dtype != torch.float32:
        raise CheckpointError(f"{where}: tensor '{name}{SCALE_SUFFIX}' is {scale.dtype}, expected float32")
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise CheckpointError(f"{where}: tensor '{name}{SCALE_SUFFIX}' is {float(scale)}, expected a "
                              "positive finite scale")
    return packed, scale


def is_packed(reader: "CheckpointReader") -> bool:
    """True for a memwise packed checkpoint (by its metadata); an unknown format version is an error."""
    where = str(reader.directory)
    if reader.metadata.get("format") != PACKED_FORMAT:
        if any(n.endswith(PACKED_SUFFIX) for n in reader.names()):
            raise CheckpointError(f"{where}: holds packed tensors ('*{PACKED_SUFFIX}') but its safetensors "
                                  f"metadata lacks format={PACKED_FORMAT!r}")
        return False
    version = reader.metadata.get("format_version")
    if version != PACKED_FORMAT_VERSION:
        raise CheckpointError(f"{where}: packed format_version {version!r} is not supported "
                              f"(this memwise reads {PACKED_FORMAT} version {PACKED_FORMAT_VERSION})")
    return True


