"""Reading checkpoint tensors one at a time.

Supported layouts of a model directory (Hugging Face's):
  model.safetensors | model.safetensors.index.json + shards | pytorch_model.bin | pytorch_model.bin.index.json + shards

safetensors files are read with positioned reads into a fresh tensor rather than through a memory
map: pages of a mapped file count towards the process's resident set as they are touched, so a
mapped 5 GB checkpoint would look (and be measured) like 5 GB of RSS. A read keeps RSS at the size
of the one tensor being converted.
"""
from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from memwise.dtypes import SAFETENSORS_DTYPES
from memwise.errors import CheckpointError, shown
from memwise.json_file import read_json_object

MAX_HEADER_BYTES = 100 * 1024 * 1024
# A numbered layer in any family's tensor names: "model.layers.3.", "transformer.h.3.", "model.decoder.layers.3."
LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


@dataclass
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int     # absolute byte offset in the file
    nbytes: int


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header says {header_len} bytes, file has {size})")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is {shown(metadata)}, "
                              "expected an object of strings)")
    data_start = 8 + header_len
    entries = {name: _header_entry(path, name, info, data_start, size) for name, info in header.items()}
    _check_tiling(path, entries, data_start, size)
    return entries, metadata


def _header_entry(path: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    """One tensor's header entry, checked as the format specifies: a known dtype, a shape of
    non-negative integers, and data offsets [begin, end) that hold exactly that many bytes."""
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header entry for '{name}': {what}")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise corrupt(f"expected an object with dtype, shape and data_offsets, found {shown(info)}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {shown(dtype_name)} "
                              f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise corrupt(f"shape {shown(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise corrupt(f"data_offsets {shown(offsets)} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    dtype = SAFETENSORS_DTYPES[dtype_name]
    expected = dtype.itemsize * _numel(tuple(shape))
    if end - begin != expected:
        raise corrupt(f"{end - begin} bytes for shape {shape} of {dtype_name} (expected {expected})")
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated: tensor '{name}' ends at byte {data_start + end}, "
                              f"file has {size}")
    return TensorEntry(path, dtype, tuple(shape), data_start + begin, expected)


def _span(indices: list[int]) -> str:
    return str(indices[0]) if len(indices) == 1 else f"{indices[0]}..{indices[-1]}"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(path: Path, entries: dict[str, TensorEntry], data_start: int, size: int) -> None:
    """The format's rule: tensors tile the data buffer, in order, without holes or overlaps (two
    entries on the same bytes would load as two silently equal weights)."""
    at, previous = data_start, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if entry.offset < at:
            raise CheckpointError(f"{path}: tensors '{previous}' and '{name}' overlap (bytes "
                                  f"{entry.offset - data_start}.. of the data overlap the end of '{previous}' "
                                  f"at {at - data_start})")
        if entry.offset > at:
            raise CheckpointError(f"{path}: corrupt safetensors data: a hole of {entry.offset - at} bytes "
                                  f"before tensor '{name}'")
        at, previous = entry.offset + entry.nbytes, name
    if at != size:
        raise CheckpointError(f"{path}: corrupt safetensors data: {size - at} bytes after the last tensor")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class CheckpointReader:
    """The tensors of one model directory, read on demand: names, shapes, and one tensor at a time."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self._torch_state: dict[str, torch.Tensor] = {}
        self._torch_files: list[Path] = []
        d = self.directory
        if (d / "model.safetensors.index.json").is_file():
            for shard in self._shards(d / "model.safetensors.index.json"):
                self._add_safetensors(d / shard)
        elif (d / "model.safetensors").is_file():
            self._add_safetensors(d / "model.safetensors")
        elif (d / "pytorch_model.bin.index.json").is_file():
            for shard in self._shards(d / "pytorch_model.bin.index.json"):
                self._add_torch(d / shard)
        elif (d / "pytorch_model.bin").is_file():
            self._add_torch(d / "pytorch_model.bin")
        else:
            raise CheckpointError(f"{d}: no weights found (expected model.safetensors, "
                                  "model.safetensors.index.json, pytorch_model.bin or its index)")
        self.files = sorted({e.file for e in self.entries.values()} | set(self._torch_files))

    def _shards(self, index_path: Path) -> list[str]:
        index = read_json_object(index_path, CheckpointError)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_path}: malformed index ('weight_map' should map tensor names "
                                  "to shard file names)")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if Path(shard).name != shard:   # a shard lives beside its index, never elsewhere
                raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in this directory")
            if not (index_path.parent / shard).is_file():
                raise CheckpointError(f"{index_path}: shard {shard} is missing")
        return shards

    def _add(self, path: Path, entries: dict[str, TensorEntry]) -> None:
        twice = sorted(entries.keys() & self.entries.keys())
        if twice:   # which copy would win depends on shard order: refuse rather than pick one
            raise CheckpointError(f"{path}: tensor '{twice[0]}' is also in {self.entries[twice[0]].file.name}")
        self.entries.update(entries)

    def _add_safetensors(self, path: Path) -> None:
        entries, metadata = _read_safetensors_header(path)
        self._add(path, entries)
        self.metadata.update(metadata)

    def _add_torch(self, path: Path) -> None:
        # Memory-mapped when the file is a zip archive (torch >= 1.6); the legacy format cannot be.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # torch raises many types for a damaged zip or pickle
            raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
        self._torch_files.append(path)
        tensors = {name: t for name, t in state.items() if isinstance(name, str) and isinstance(t, torch.Tensor)}
        self._add(path, {name: TensorEntry(path, t.dtype, tuple(t.shape), -1, t.numel() * t.element_size())
                         for name, t in tensors.items()})
        self._torch_state.update(tensors)

    def check_layer_count(self, num_layers: int, config: str) -> None:
        """The checkpoint's numbered layers must be exactly 0 .. num_layers - 1, as `config` says: a
        checkpoint with more layers than its config would run truncated, one with fewer cannot run.
        Checked before anything is built per layer (a config can claim 10^9 layers)."""
        found = sorted({int(m.group(1)) for name in self.entries if (m := LAYER_NAME.search(name))})
        unused = [i for i in found if i >= num_layers]
        if unused:
            raise CheckpointError(f"{self.directory}: the checkpoint holds layer(s) {_span(unused)} that {config} "
                                  f"does not use (it says {num_layers} layer{'s' if num_layers != 1 else ''}): the config does not "
                                  "match the weights")
        if len(found) < num_layers:
            first_missing = next(i for i in range(len(found) + 1) if i >= len(found) or found[i] != i)
            raise CheckpointError(f"{config}: says {num_layers} layers, but the checkpoint in {self.directory} "
                                  f"holds {len(found)} (layer {first_missing} is the first missing)")

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def entry(self, name: str) -> TensorEntry:
        """Where tensor `name` is, its dtype and shape; a missing name is an error naming the directory."""
        if name not in self.entries:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        return self.entries[name]

    def expect(self, name: str, shape: tuple[int, ...], floating: bool = False) -> TensorEntry:
        """The entry of tensor `name`, checked from the header alone: it must have `shape`, and with
        `floating` a floating-point dtype (an integer weight would load as huge values)."""
        entry = self.entry(name)
        if entry.shape != tuple(shape):
            raise CheckpointError(f"{entry.file}: tensor '{name}' has shape {list(entry.shape)}, "
                                  f"expected {list(shape)}")
        if floating and not entry.dtype.is_floating_point:
            raise CheckpointError(f"{entry.file}: tensor '{name}' is {str(entry.dtype).removeprefix('torch.')}; "
                                  "a weight must be a floating-point tensor")
        return entry

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name` in its stored dtype, in memory of its own; checks `shape` when given."""
        entry = self.entry(name)
        if shape is not None and tuple(shape) != entry.shape:
            raise CheckpointError(f"{entry.file}: tensor '{name}' has shape {list(entry.shape)}, "
                                  f"expected {list(shape)}")
        if entry.offset < 0:
            return self._torch_state[name]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            done = 0
            try:
                with open(entry.file, "rb", buffering=0) as f:
                    while done < entry.nbytes:  # one read returns at most ~2 GiB on Linux
                        got = os.preadv(f.fileno(), [view[done:]], entry.offset + done)
                        if got <= 0:
                            raise CheckpointError(f"{entry.file}: truncated while reading tensor '{name}'")
                        done += got
            except OSError as e:
                raise CheckpointError(f"{entry.file}: cannot read tensor '{name}' ({e.strerror or e})") from None
        return tensor
