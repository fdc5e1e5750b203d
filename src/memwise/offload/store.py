"""The offload file: a model's weights on disk in memwise's in-memory formats, one contiguous,
page-aligned region per decoder layer, so that loading a layer is one read plus zero-copy views.

Byte layout (all integers little-endian):

    0     8 bytes   magic b"MWOFFLD\\0"
    8     u32       format version (FORMAT_VERSION)
    12    u32       n: length of the JSON header that follows
    16    u32       CRC-32 of those n bytes
    20    n bytes   JSON header (StoreHeader: model id, model digest, weights fingerprint, scheme,
                    dtype, the tensor table of one layer and of the rest, per-region offset, size, CRC-32)
    ...   zeros up to the first multiple of ALIGN
    then  layer 0, layer 1, ... each one region of `region_size` bytes at an ALIGN-aligned offset
    then  the rest: the model's tensors outside its layers (embeddings, final norm, lm_head)

Inside a region each tensor starts at a multiple of TENSOR_ALIGN (the alignment torch's CPU
allocator gives, so kernels see the same alignment as in an in-memory model) and holds its bytes as
they are in memory (row-major, native dtype): float32/bfloat16 tensors, or the quantized layouts of
memwise.models.decoder.quantized (int8 rows + scales + row sums, 4-bit codes + group parameters, ...).

A file is written under a temporary name and renamed once complete and synced: a killed or failed
write leaves no file under the final name. This module knows regions and tensors, never a model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from memwise.errors import MemwiseError

MAGIC = b"MWOFFLD\0"
FORMAT_VERSION = 2      # 2: int4's group constants are float16 (an older file is rebuilt, not read)
ALIGN = 4096            # regions: page size and O_DIRECT's alignment
TENSOR_ALIGN = 64       # tensors inside a region
_PREAMBLE = struct.Struct("<8sIII")


class OffloadError(MemwiseError):
    """An offload request that cannot run: budget, directory, or offload file."""


class StaleStoreError(OffloadError):
    """A memwise offload file of this model that is out of date or damaged: rebuilt, not used."""


@dataclass(frozen=True)
class TensorSlot:
    name: str                   # state name inside the module the region belongs to ("attn.qkv.weight")
    dtype: str                  # torch dtype name without "torch."
    shape: tuple[int, ...]
    offset: int                 # bytes from the region's start

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class Region:
    offset: int                 # bytes from the file's start, a multiple of ALIGN
    size: int                   # bytes, a multiple of ALIGN (the tensors' bytes, then zeros)
    crc32: int


@dataclass
class StoreHeader:
    model_id: str               # the source, for messages
    model_digest: str           # architecture, dtype, scheme (and seed for synthetic weights)
    weights_fingerprint: str    # the checkpoint files (names, sizes, mtimes): a change means stale
    scheme: str                 # "none" or a quantization scheme
    dtype: str
    layer_tensors: list[TensorSlot]
    rest_tensors: list[TensorSlot]
    layers: list[Region]
    rest: Region

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> "StoreHeader":
        raw = json.loads(data)
        slots = lambda items: [TensorSlot(s["name"], s["dtype"], tuple(s["shape"]), s["offset"]) for s in items]
        return StoreHeader(raw["model_id"], raw["model_digest"], raw["weights_fingerprint"], raw["scheme"],
                           raw["dtype"], slots(raw["layer_tensors"]), slots(raw["rest_tensors"]),
                           [Region(**r) for r in raw["layers"]], Region(**raw["rest"]))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tensor_table(tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[list[TensorSlot], int]:
    """Slots for (name, dtype, shape) in order, each TENSOR_ALIGN-aligned; and the region size (ALIGN-rounded)."""
    slots, at = [], 0
    for name, dtype, shape in tensors:
        slot = TensorSlot(name, str(dtype).removeprefix("torch."), tuple(shape), at)
        slots.append(slot)
        at = round_up(at + slot.nbytes, TENSOR_ALIGN)
    return slots, round_up(max(at, 1), ALIGN)


def header_bytes(header: StoreHeader) -> int:
    """Bytes before the first region: the preamble and the JSON, rounded up to ALIGN."""
    return round_up(_PREAMBLE.size + len(header.to_json()), ALIGN)


def file_size(header: StoreHeader) -> int:
    return header.rest.offset + header.rest.size


def layout(header: StoreHeader, num_layers: int, layer_size: int, rest_size: int) -> StoreHeader:
    """The header with every region placed (CRCs zero until written)."""
    # the widest values every field can take, so that the final JSON is never longer than the space
    # reserved for it (it would run into layer 0)
    widest = Region(10**15, layer_size, 0xFFFFFFFF)
    placeholder = dataclasses.replace(header, layers=[widest] * num_layers, rest=Region(10**15, rest_size, 0xFFFFFFFF))
    start = header_bytes(placeholder)
    layers = [Region(start + i * layer_size, layer_size, 0) for i in range(num_layers)]
    return dataclasses.replace(header, layers=layers, rest=Region(start + num_layers * layer_size, rest_size, 0))


def views(buffer: torch.Tensor, slots: list[TensorSlot]) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a region's bytes (`buffer`: a uint8 tensor over the region)."""
    out = {}
    for slot in slots:
        raw = buffer[slot.offset:slot.offset + slot.nbytes]
        out[slot.name] = raw.view(getattr(torch, slot.dtype)).view(slot.shape)
    return out


class StoreWriter:
    """Writes one offload file region by region under a temporary name; `commit` syncs, writes the
    header and renames it into place. Closing without commit removes the temporary file."""

    def __init__(self, path: Path, header: StoreHeader):
        self.path, self.header = path, header
        self.temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self._file = open(self.temporary, "wb")
        self._crcs: dict[int, int] = {}
        self._rest_crc: int | None = None

    def write_region(self, index: int | None, data: memoryview) -> None:
        """Layer `index`'s region (None: the rest), `data` exactly the region's size."""
        region = self.header.rest if index is None else self.header.layers[index]
        if len(data) != region.size:
            raise ValueError(f"region {index}: {len(data)} bytes, expected {region.size}")
        self._file.seek(region.offset)
        self._file.write(data)
        crc = zlib.crc32(data)
        if index is None:
            self._rest_crc = crc
        else:
            self._crcs[index] = crc

    def commit(self) -> StoreHeader:
        if len(self._crcs) != len(self.header.layers) or self._rest_crc is None:
            raise ValueError(f"{self.temporary}: commit before every region was written")
        header = dataclasses.replace(
            self.header, layers=[dataclasses.replace(r, crc32=self._crcs[i]) for i, r in enumerate(self.header.layers)],
            rest=dataclasses.replace(self.header.rest, crc32=self._rest_crc))
        data = header.to_json()
        if _PREAMBLE.size + len(data) > header.layers[0].offset:
            raise ValueError(f"{self.temporary}: the header outgrew its {header.layers[0].offset} bytes")
        self._file.seek(0)
        self._file.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(data), zlib.crc32(data)) + data)
        self._file.flush()
        os.fsync(self._file.fileno())
        _drop_cached(self._file.fileno())
        self._file.close()
        os.replace(self.temporary, self.path)
        return header

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.temporary.unlink(missing_ok=True)


def _drop_cached(fd: int) -> None:
    # The file was just written through the page cache; dropping it there keeps the cache from
    # holding the model (the streaming reads bypass the cache anyway) and frees memory for others.
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def remove_abandoned(path: Path) -> None:
    """Temporary files of `path` left by writers that are no longer running (killed runs)."""
    for candidate in path.parent.glob(f"{path.name}.tmp-*"):
        pid = candidate.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
            candidate.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_header(path: Path, expect: StoreHeader) -> StoreHeader:
    """The header of the offload file at `path`, checked against the one this run would write.

    A file that is not a memwise offload file, holds another model, or comes from a newer memwise
    raises OffloadError (it is not ours to delete); a memwise file of this model that is older,
    damaged or made from other weights raises StaleStoreError (the caller rebuilds it)."""
    with open(path, "rb") as f:
        preamble = f.read(_PREAMBLE.size)
        if len(preamble) < _PREAMBLE.size or preamble[:8] != MAGIC:
            raise OffloadError(f"{path}: not a memwise offload file (bad magic); move it away or choose another "
                               "offload_dir")
        _, version, length, crc = _PREAMBLE.unpack(preamble)
        if version > FORMAT_VERSION:
            raise OffloadError(f"{path}: offload file format {version} is newer than this memwise's "
                               f"({FORMAT_VERSION}); upgrade memwise or choose another offload_dir")
        if version < FORMAT_VERSION:
            raise StaleStoreError(f"{path}: offload file format {version} is older than {FORMAT_VERSION}")
        data = f.read(length)
    if len(data) != length or zlib.crc32(data) != crc:
        raise StaleStoreError(f"{path}: header checksum mismatch (damaged or truncated file)")
    try:
        header = StoreHeader.from_json(data)
    except (ValueError, KeyError, TypeError) as e:
        raise StaleStoreError(f"{path}: unreadable header ({e})") from None
    if header.model_digest != expect.model_digest:
        raise OffloadError(f"{path}: holds another model ({header.model_id}, digest {header.model_digest[:12]}, "
                           f"expected {expect.model_digest[:12]} for {expect.model_id}); move it away or choose "
                           "another offload_dir")
    if header.weights_fingerprint != expect.weights_fingerprint:
        raise StaleStoreError(f"{path}: written from other weights files than {expect.model_id} has now")
    if (header.layer_tensors, header.rest_tensors) != (expect.layer_tensors, expect.rest_tensors):
        raise StaleStoreError(f"{path}: its tensor layout differs from this memwise's")
    if os.path.getsize(path) != file_size(header):
        raise StaleStoreError(f"{path}: {os.path.getsize(path)} bytes, its header says {file_size(header)}")
    return header


def verify_regions(header: StoreHeader, read_region: Callable[[Region], memoryview], path: Path) -> None:
    """Every region's CRC-32, read through `read_region` (StaleStoreError on a mismatch)."""
    for index, region in enumerate([*header.layers, header.rest]):
        if zlib.crc32(read_region(region)) != region.crc32:
            which = f"layer {index}" if index < len(header.layers) else "the non-layer weights"
            raise StaleStoreError(f"{path}: checksum mismatch in {which}")
