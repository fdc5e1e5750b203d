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
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from memwise.dtypes import SAFETENSORS_DTYPES
from memwise.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int     # absolute byte offset in the file
    nbytes: int


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                  f"(header says {header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is "
                              f"{type(metadata).__name__}, expected an object)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as e:
            if isinstance(info, dict) and "dtype" in info and info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}") from None
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{name}' (missing {e})") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{name}'") from None
        nbytes = end - begin
        expected = dtype.itemsize * _numel(shape)
        if nbytes != expected or begin < 0:
            raise CheckpointError(f"{path}: corrupt entry for '{name}': {nbytes} bytes for shape "
                                  f"{list(shape)} of {info['dtype']} (expected {expected})")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor '{name}' ends at byte {data_start + end}, "
                                  f"file has {size}")
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, nbytes)
    _check_tiling(path, entries, data_start, size)
    return entries, {str(k): str(v) for k, v in metadata.items()}


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
        try:
            index = json.loads(index_path.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_path}: malformed index ({e})") from None
        for shard in shards:
            if not (index_path.parent / shard).is_file():
                raise CheckpointError(f"{index_path}: shard {shard} is missing")
        return shards

    def _add_safetensors(self, path: Path) -> None:
        entries, metadata = _read_safetensors_header(path)
        self.entries.update(entries)
        self.metadata.update(metadata)

    def _add_torch(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a damaged zip or pickle
            raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
        self._torch_files.append(path)
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                self._torch_state[name] = tensor
                self.entries[name] = TensorEntry(path, tensor.dtype, tuple(tensor.shape), -1,
                                                 tensor.numel() * tensor.element_size())

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        return self.entries[name]

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name` in its stored dtype, in memory of its own; checks `shape` when given."""
        entry = self._entry(name)
        if shape is not None and tuple(shape) != entry.shape:
            raise CheckpointError(f"{entry.file}: tensor '{name}' has shape {list(entry.shape)}, "
                                  f"expected {list(shape)}")
        if entry.offset < 0:
            return self._torch_state[name]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            done = 0
            with open(entry.file, "rb", buffering=0) as f:
                while done < entry.nbytes:  # one read returns at most ~2 GiB on Linux
                    got = os.preadv(f.fileno(), [view[done:]], entry.offset + done)
                    if got <= 0:
                        raise CheckpointError(f"{entry.file}: truncated while reading tensor '{name}'")
                    done += got
        return tensor
