"""Streaming layers from an offload file: page-cache-bypassing reads and a read-ahead I/O thread.

Model-free: a layer is a torch module whose tensors are replaced by views of a buffer. A model that
streams calls `stream.layers(modules)` in its forward pass instead of iterating its modules: it gets
each module ready to run, with its weights bound (resident layers: once; streamed layers: from the
ring of read-ahead buffers). The I/O thread reads the streamed layers in cyclic order (the order
every forward pass visits them) into the free buffers, so layer i+1 (and further, as the budget
allows) is read while layer i computes; a buffer is freed when the pass moves past its layer.
"""
from __future__ import annotations

import mmap
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Sequence

import torch
from torch import nn

from memwise.offload.store import Region, TensorSlot, views

READ_CHUNK = 64 * 2**20     # bytes per read call: large reads, bounded so a single one is not huge
HUGE_PAGE = 2 << 20


@dataclass
class AlignedBuffer:
    """Page-aligned anonymous memory (what O_DIRECT needs): `view` over it and a uint8 `tensor` of it.

    Private memory, 2 MiB-aligned and advised to use transparent huge pages where it is that large:
    the products stream every byte of a layer, and on 4 KiB pages they measured twice as slow (TLB
    misses) as on the memory torch allocates. Shared anonymous memory (mmap's default) gets no huge pages."""
    view: memoryview
    tensor: torch.Tensor
    memory: object = None       # what `view` is cut from, kept alive with it

    @staticmethod
    def allocate(size: int) -> "AlignedBuffer":
        if size < HUGE_PAGE or os.environ.get("MEMWISE_HUGE_PAGES", "1") == "0":
            memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
            start = 0
        else:
            memory = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    memory.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass        # THP disabled: small pages, slower products, same results
            start = -torch.frombuffer(memory, dtype=torch.uint8).data_ptr() % HUGE_PAGE
        view = memoryview(memory)[start:start + size]
        return AlignedBuffer(view, torch.frombuffer(view, dtype=torch.uint8), memory)


class RegionReader:
    """Reads whole regions of one file with O_DIRECT, or, where the filesystem refuses it (tmpfs,
    some network filesystems), with ordinary reads whose pages are dropped from the cache after each
    read; `direct` says which, `fallback_reason` why."""

    def __init__(self, path: Path, direct: bool = True):
        self.path = path
        self.fallback_reason: str | None = None if direct else "O_DIRECT not requested (MEMWISE_OFFLOAD_DIRECT=0)"
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                self.fallback_reason = f"the filesystem refused O_DIRECT ({e.strerror})"
        elif direct:
            self.fallback_reason = "this platform has no O_DIRECT"
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY)

    @property
    def direct(self) -> bool:
        return self.fallback_reason is None

    def read_into(self, region: Region, buffer: AlignedBuffer) -> memoryview:
        view = buffer.view[:region.size]
        done = 0
        while done < region.size:
            end = min(done + READ_CHUNK, region.size)
            try:
                n = os.preadv(self.fd, [view[done:end]], region.offset + done)
            except OSError as e:
                if not self.direct or done:
                    raise
                self._fall_back(f"an O_DIRECT read failed ({e.strerror})")
                continue
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file at byte {region.offset + done}")
            done += n
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, region.offset, region.size, os.POSIX_FADV_DONTNEED)
        return view

    def _fall_back(self, reason: str) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.fallback_reason = reason

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def bind(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point `module`'s parameters and buffers (by state name) at `tensors` without copying."""
    for name, tensor in tensors.items():
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor


def streaming_order(num_layers: int) -> list[int]:
    """Every layer once, in the order layers start to stream as the budget shrinks, so that the first
    s (streamed) and the last r (resident) are each spread through the pass: midpoints of the pass,
    then of its halves, then of their halves, ..., each level's midpoints in bit-reversed order. Over
    1 to 128 layers, no stretch of streamed layers is longer than 3x an even spacing's (2x while at
    least half the layers stay resident)."""
    order: list[int] = []
    spans = [(0, num_layers)]
    while spans:
        spans = [(lo, hi) for lo, hi in spans if lo < hi]
        middles = [(lo + hi) // 2 for lo, hi in spans]
        bits = max(1, (len(middles) - 1).bit_length())
        order += [middles[i] for i in sorted(range(len(middles)), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))]
        spans = [half for (lo, hi), mid in zip(spans, middles) for half in ((lo, mid), (mid + 1, hi))]
    return order


def spread_resident(num_layers: int, resident: int) -> list[int]:
    """Which `resident` of `num_layers` layers to keep in memory: the others spread through the pass,
    so that each read overlaps the compute of the resident layers before its layer, as the planner's
    max(compute, read) assumes (streamed layers bunched together share only their own compute with
    their reads). The sets are nested: a plan that keeps one layer more reads one layer more."""
    if not 0 <= resident <= num_layers:
        raise ValueError(f"resident layers should be in 0..{num_layers}, found {resident}")
    streamed = set(streaming_order(num_layers)[:num_layers - resident])
    return [i for i in range(num_layers) if i not in streamed]


class LayerStream:
    """Runs `num_layers` layers of which `resident` are kept in memory and the rest are read from the
    file through `buffers` ring buffers (>= 1; 2 or more overlap reading and computing). `kept`: resident
    layers whose modules still hold their weights from a stream this one replaces (not read again)."""

    def __init__(self, reader: RegionReader, regions: Sequence[Region], slots: list[TensorSlot],
                 resident: Sequence[int], buffers: int, kept: Collection[int] = ()):
        self.reader, self.regions, self.slots = reader, list(regions), slots
        self.resident = sorted(set(resident))
        self.streamed = [i for i in range(len(self.regions)) if i not in set(self.resident)]
        self.bytes_read = 0
        self._resident_views: dict[int, dict[str, torch.Tensor]] = {}
        for index in set(self.resident) - set(kept):
            buffer = AlignedBuffer.allocate(self.regions[index].size)
            reader.read_into(self.regions[index], buffer)
            self._resident_views[index] = views(buffer.tensor, slots)
        count = min(buffers, len(self.streamed))
        size = max((self.regions[i].size for i in self.streamed), default=0)
        self._buffers = [AlignedBuffer.allocate(size) for _ in range(count)]
        self._buffer_views = [views(b.tensor, slots) for b in self._buffers]
        self._free: queue.Queue[int] = queue.Queue()
        self._ready: queue.Queue[tuple[int, int, BaseException | None]] = queue.Queue()
        self._stop = threading.Event()
        for slot in range(count):
            self._free.put(slot)
        self._thread = None
        self._failed: BaseException | None = None
        if self.streamed:
            self._thread = threading.Thread(target=self._read_ahead, name="memwise-offload-io", daemon=True)
            self._thread.start()

    def _read_ahead(self) -> None:
        turn = 0
        while not self._stop.is_set():
            slot = self._free.get()
            if slot < 0:
                return
            index = self.streamed[turn % len(self.streamed)]
            turn += 1
            try:
                self.reader.read_into(self.regions[index], self._buffers[slot])
            except BaseException as e:       # handed to the computing thread, which raises it
                self._ready.put((index, slot, e))
                return
            self.bytes_read += self.regions[index].size
            self._ready.put((index, slot, None))

    def layers(self, modules: Sequence[nn.Module]) -> Iterator[nn.Module]:
        """`modules` in order, each with its weights bound while the caller runs it."""
        for index, module in enumerate(modules):
            if index in self._resident_views:
                bind(module, self._resident_views.pop(index))
            if index in self.resident:
                yield module
                continue
            slot = self._take(index)
            bind(module, self._buffer_views[slot])
            try:
                yield module
            finally:
                self._free.put(slot)

    def bind_resident(self, modules: Sequence[nn.Module], indexes: Collection[int]) -> None:
        """Bind these resident layers' weights to their modules now (a pass binds them at first use):
        a stream that replaces this one keeps them."""
        for index in indexes:
            if index in self._resident_views:
                bind(modules[index], self._resident_views.pop(index))

    def _take(self, index: int) -> int:
        # Reads arrive in cyclic order; a pass that stopped midway (an exception in a layer) leaves
        # the reads of the layers it skipped, which are handed back until this layer's read arrives.
        while True:
            if self._failed is not None:
                raise self._failed
            got, slot, error = self._ready.get()
            if error is not None:
                self._failed = _read_failure(self.reader.path, self.regions[got], error)
                raise self._failed
            if got == index:
                return slot
            self._free.put(slot)

    def close(self) -> None:
        self._stop.set()
        self._free.put(-1)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.reader.close()

    def release(self) -> None:
        """Close, and drop this stream's buffers now (not when a collection breaks the stream's cycle
        with its thread): a stream replaced by another must not hold its layers beside the new one's."""
        self.close()
        self._resident_views.clear()
        self._buffer_views.clear()
        self._buffers.clear()


def _read_failure(path: Path, region: Region, error: BaseException) -> BaseException:
    """An OSError of the I/O thread as the one-line error a user sees (the file went away, a disk error)."""
    from memwise.offload.store import OffloadError
    if isinstance(error, OSError):
        return OffloadError(f"{path}: reading {region.size} bytes at offset {region.offset} failed ({error}); "
                            "the offload file is rebuilt on the next load if it is damaged")
    return error
