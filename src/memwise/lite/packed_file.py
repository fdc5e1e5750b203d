"""A packed checkpoint (`memwise convert` output, memwise.models.ternary) read with numpy, without torch.

The weights file is a safetensors file; its header is JSON, so it is parsed here directly rather than
with safetensors.numpy, which has no bfloat16 (the dtype of released embeddings and gains).

Every tensor is read with plain reads (pread), never mapped: the codes into the huge-page buffer
that every decode step streams, the gains into new float32 arrays, and the embedding table one row
per token (`read_rows`), so that the table stays in the page cache, which the kernel can drop and
refill, instead of in the process. (Mapping it would not keep it out: the page cache holds a file
in large folios, and a fault maps a whole folio, so 128 random rows of mmfree-370m's 64 MiB table
mapped nearly all of it.)
"""
from __future__ import annotations

import json
import os
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

    def _pread(self, out: np.ndarray, offset: int, name: str) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        if os.preadv(self._file.fileno(), [view], offset) != len(view):
            raise CheckpointError(f"{self.path}: tensor '{name}' is cut short (truncated file)")

    def read(self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[str, ...] | None = None) -> np.ndarray:
        """The tensor as a new array (bfloat16 as raw uint16)."""
        e = self.entry(name, shape, dtypes)
        out = np.empty(e.shape, dtype=DTYPES[e.dtype])
        self._pread(out, e.begin, name)
        return out

    def read_into(self, name: str, out: np.ndarray) -> None:
        """The tensor's bytes copied into `out` (contiguous, exactly as many bytes)."""
        e = self.entry(name)
        if out.nbytes != e.end - e.begin:
            raise CheckpointError(f"{self.path}: tensor '{name}' holds {e.end - e.begin} bytes, expected {out.nbytes}")
        self._pread(out, e.begin, name)

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a 2-d tensor, [len(rows), columns] (one read per row, from the page cache once warm)."""
        e = self.entry(name)
        out = np.empty((len(rows), e.shape[1]), dtype=DTYPES[e.dtype])
        row_bytes = out.shape[1] * out.itemsize
        for k, row in enumerate(rows):
            self._pread(out[k], e.begin + int(row) * row_bytes, name)
        return out

    def float32(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float tensor (float32, float16 or bfloat16 in the file) as a new float32 array."""
        e = self.entry(name, shape, ("F32", "F16", "BF16"))
        return as_float32(self.read(name), e.dtype)

    def close(self) -> None:
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
