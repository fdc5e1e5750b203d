"""A packed checkpoint (`memwise convert` output, memwise.models.ternary) read with numpy, without torch.

The weights file is a safetensors file; its header is JSON, so it is parsed here directly rather than
with safetensors.numpy, which has no bfloat16 (the dtype of released embeddings and gains).

Two ways to get a tensor, chosen by how the runtime uses it:

* `mapped(name)`: a read-only numpy view of the file, mapped. The embedding table is read one row per
  token, so only the rows a run touches become resident, and as page cache, which the kernel can drop.
* `read_into(name, out)`: the bytes copied into a buffer the caller owns (the packed codes, which every
  decode step streams in full and which go into huge pages). Plain reads, not the mapping: a mapped
  page that was copied would count twice in the resident set until the mapping is gone.
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memwise.errors import CheckpointError
from memwise.models.ternary.packed_format import PACKED_FORMAT, PACKED_FORMAT_VERSION

WEIGHTS_FILE = "model.safetensors"

# safetensors dtype names -> numpy dtypes of the same width; bfloat16 is read as its raw 16 bits.
DTYPES = {"U8": np.uint8, "I8": np.int8, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32,
          "I64": np.int64, "F64": np.float64}
HEADER_LIMIT = 100 << 20     # the safetensors library's own limit on a header


@dataclass(frozen=True)
class Entry:
    dtype: str                  # safetensors name: "U8", "BF16", ...
    shape: tuple[int, ...]
    begin: int                  # absolute byte offsets in the file
    end: int


class PackedFile:
    """The tensors of one packed weights file, by name, checked against the file's size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        size = self.path.stat().st_size
        self.metadata, self.entries = _parse_header(self._file, size, str(self.path))
        if self.metadata.get("format") != PACKED_FORMAT:
            raise CheckpointError(f"{self.path}: not a memwise packed checkpoint (metadata format "
                                  f"{self.metadata.get('format')!r}, expected {PACKED_FORMAT!r}; write one "
                                  "with `memwise convert`)")
        if self.metadata.get("format_version") != PACKED_FORMAT_VERSION:
            raise CheckpointError(f"{self.path}: packed format_version {self.metadata.get('format_version')!r} is "
                                  f"not supported (this memwise reads version {PACKED_FORMAT_VERSION})")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def entry(self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[str, ...] | None = None) -> Entry:
        """The header entry of `name`, checked to have `shape` and one of `dtypes` when given."""
        found = self.entries.get(name)
        if found is None:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing")
        if shape is not None and found.shape != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor '{name}' has shape {list(found.shape)}, expected {list(shape)}")
        if dtypes is not None and found.dtype not in dtypes:
            raise CheckpointError(f"{self.path}: tensor '{name}' is {found.dtype}, expected {' or '.join(dtypes)}")
        return found

    def mapped(self, name: str, shape: tuple[int, ...] | None = None,
               dtypes: tuple[str, ...] | None = None) -> np.ndarray:
        """A read-only view of the tensor in the mapped file (bfloat16 as uint16)."""
        e = self.entry(name, shape, dtypes)
        count = int(np.prod(e.shape, dtype=np.int64))
        return np.frombuffer(self._map, dtype=DTYPES[e.dtype], count=count, offset=e.begin).reshape(e.shape)

    def read_into(self, name: str, out: np.ndarray) -> None:
        """The tensor's bytes copied into `out` (contiguous, exactly as many bytes)."""
        e = self.entry(name)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if len(view) != e.end - e.begin:
            raise CheckpointError(f"{self.path}: tensor '{name}' holds {e.end - e.begin} bytes, expected {len(view)}")
        self._file.seek(e.begin)
        if self._file.readinto(view) != len(view):
            raise CheckpointError(f"{self.path}: tensor '{name}' is cut short (truncated file)")

    def float32(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float tensor (float32, float16 or bfloat16 in the file) as a new float32 array."""
        e = self.entry(name, shape, ("F32", "F16", "BF16"))
        return as_float32(self.mapped(name), e.dtype)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()


def as_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 of stored values: bfloat16 (raw uint16) widened exactly, as torch's .float() does."""
    if dtype == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(values, dtype=np.float32)


def _parse_header(f, size: int, where: str) -> tuple[dict[str, str], dict[str, Entry]]:
    """The metadata and the tensors' entries of a safetensors file, every offset inside the file."""
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{where}: not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", raw)
    if length > min(HEADER_LIMIT, size - 8):
        raise CheckpointError(f"{where}: not a safetensors file (header length {length} exceeds the file)")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start, entries = 8 + length, {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: tensor '{name}' has a malformed header entry") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: tensor '{name}' has dtype {dtype!r}, which a packed checkpoint never holds")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != nbytes or begin < 0 \
                or start + end > size:
            raise CheckpointError(f"{where}: tensor '{name}' has data offsets [{begin}, {end}] that do not fit "
                                  f"its shape {list(shape)} or the file (truncated?)")
        entries[name] = Entry(dtype, shape, start + begin, start + end)
    return metadata, entries
