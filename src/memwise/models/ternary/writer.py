"""Writing a packed checkpoint (what `memwise convert SOURCE OUT` makes of a ternary model: hgrn_bit, bitnet).

Latent checkpoints store every ternary matrix as a bf16 latent matrix that is made ternary at
run time; others store codes in a layout of their own. The packed checkpoint stores what the model actually uses, so it is about 6.5 times smaller
and loads without quantizing (which matters: quantizing t * m again would give a different scale).

Output directory:

* model.safetensors, a standard safetensors file (8-byte little-endian header length, JSON header
  padded with spaces to a multiple of 8, then the tensor data), with metadata
  {"format": "memwise-ternary", "format_version": "1"}. For each ternary matrix NAME.weight [N, K]
  of the released layout it holds
      NAME.weight.packed   uint8 [N, ceil(K / 128) * 32]   2-bit codes t + 1, in the block layout
                                                          documented in memwise/kernels/packed.py (version 1)
      NAME.weight.scale    float32 []                      the matrix's scale m (weight = t * m)
  and every other tensor the model reads (embeddings, norm gains, ...) under its own name,
  in its stored dtype and shape, bytes unchanged. Tensors are ordered by element size (largest
  first), then by name, so each one starts at a multiple of its element size.
* config.json: the family's (the source's, plus a "memwise" entry describing the packing).
* the tokenizer files of the source, when it has them.

The file is written tensor by tensor (the header is known before any data, because packed shapes
follow from the config), so converting holds one source matrix at a time; safetensors' own writer
would need every tensor in memory at once. memwise.convert writes into a temporary directory and
renames it when complete.

Converting a packed checkpoint again copies its tensors unchanged: the output is identical.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from memwise.checkpoint import CheckpointReader
from memwise.dtypes import SAFETENSORS_NAMES
from memwise.errors import CheckpointError
from memwise.kernels.packed import FORMAT_VERSION, padded_cols
from memwise.models.ternary.packed_format import (PACKED_FORMAT, PACKED_FORMAT_VERSION, PACKED_SUFFIX, SCALE_SUFFIX,
                                                  TensorSlot)
from memwise.models.ternary.weights import WeightSource

WEIGHTS_FILE = "model.safetensors"
CONFIG_ENTRY = {
    "format": PACKED_FORMAT,
    "format_version": int(PACKED_FORMAT_VERSION),
    "packed_layout_version": FORMAT_VERSION,
    "ternary_tensors": "NAME.weight -> NAME.weight.packed (uint8 [N, ceil(K/128)*32], 2-bit codes t+1) "
                       "+ NAME.weight.scale (float32 m); weight = t * m",
}

Plan = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def write_packed(slots: list[TensorSlot], source: WeightSource, reader: CheckpointReader, config: dict[str, Any],
                 out: Path, progress: bool = True) -> None:
    """The packed checkpoint of the tensors `slots` names, read from `source` (whose stored tensors
    `reader` describes), into directory `out`: its weights file and config.json (`config` plus the
    packing's entry). Everything is checked against the source's header first."""
    plan = _plan(slots, source, reader)
    _write_weights(out / WEIGHTS_FILE, slots, source, plan, str(reader.directory), progress)
    (out / "config.json").write_text(json.dumps({**config, "memwise": CONFIG_ENTRY}, indent=2) + "\n")


def _plan(slots: list[TensorSlot], source: WeightSource, reader: CheckpointReader) -> Plan:
    """Every output tensor's dtype and shape, checked against the source's header before writing."""
    plan: Plan = {}
    for slot in slots:
        if slot.ternary:
            rows, cols = slot.shape
            source.check_matrix(slot.name, rows, cols)
            plan[slot.name + PACKED_SUFFIX] = (torch.uint8, (rows, padded_cols(cols) // 4))
            plan[slot.name + SCALE_SUFFIX] = (torch.float32, ())
            continue
        plan[slot.name] = (reader.expect(slot.name, slot.shape).dtype, slot.shape)
    return plan


def _layout(plan: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header (padded) and each tensor's absolute byte offset in the file."""
    order = sorted(plan, key=lambda n: (-plan[n][0].itemsize, n))
    header: dict[str, Any] = {"__metadata__": {"format": PACKED_FORMAT,
                                               "format_version": PACKED_FORMAT_VERSION}}
    begin = 0
    relative: dict[str, int] = {}
    for name in order:
        dtype, shape = plan[name]
        nbytes = dtype.itemsize * _numel(shape)
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
        relative[name] = begin
        begin += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {n: start + o for n, o in relative.items()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_weights(path: Path, slots: list[TensorSlot], source: WeightSource, plan: Plan, where: str,
                   progress: bool) -> None:
    header, offsets = _layout(plan)

    def put(f, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = plan[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(f"{where}: tensor '{name}' came out as {tensor.dtype} {list(tensor.shape)}, "
                                  f"expected {dtype} {list(shape)}")
        f.seek(offsets[name])
        f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    bar = _progress(progress, len(slots))
    try:
        with open(path, "wb") as f:
            f.write(header)
            for slot in slots:
                if slot.ternary:
                    matrix = source.matrix(slot.name, slot.shape[1], None, rows=slot.shape[0])
                    put(f, slot.name + PACKED_SUFFIX, matrix.packed)
                    put(f, slot.name + SCALE_SUFFIX, torch.tensor(matrix.scale, dtype=torch.float32))
                    del matrix
                else:
                    put(f, slot.name, source.tensor(slot.name, slot.shape))
                if bar is not None:
                    bar[0].advance(bar[1])
            f.flush()
            os.fsync(f.fileno())
    finally:
        if bar is not None:
            bar[0].stop()


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    bar = Progress(TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    bar.start()
    return bar, bar.add_task("packing", total=total)
