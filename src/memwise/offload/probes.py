"""Measuring this machine's offload cost figures (memwise.offload.costs describes each), and
`machine_costs`: the cached figures, or measured and cached when there are none.

Every probe runs the code a model runs: the disk test reads with O_DIRECT into the layer stream's
kind of buffer, the products are the decoder family's own linears, the attention is torch's
scaled_dot_product_attention over a cache sliced as DecoderCache slices it.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from memwise.offload.costs import (BESIDE_READS_SECONDS, DISK_CHUNK, DISK_FILE_BYTES, FEW_ROWS_BATCH, GEMM_BATCH,
                                   KERNEL_SCHEMES, MATRIX_SHAPE, PREFILL_BATCH, Costs, CostsError, cache_path,
                                   load_costs, machine_id, save_costs)


def machine_costs(disk_directory: Path | None = None, remeasure: bool = False, cache_dir: Path | None = None,
                  log: Callable[[str], None] | None = None) -> Costs:
    """This machine's figures: the cached ones, or measured (tens of seconds) and cached when there
    are none, when the cache is unreadable, or when `remeasure`."""
    path = cache_path(cache_dir)
    if path.exists() and not remeasure:
        try:
            costs = load_costs(path)
        except CostsError as e:
            if log:
                log(f"{e}; measuring again")
        else:
            if disk_directory is None or Path(costs.disk_directory) == Path(disk_directory):
                return costs
            # another directory may be another disk: its read figure is its own
            if log:
                log(f"measuring the disk read bandwidth of {disk_directory} (cached in {path})")
            disk, direct = disk_read_bandwidth(Path(disk_directory))
            costs = replace(costs, disk_read_bytes_per_s=disk, disk_direct=direct, disk_directory=str(disk_directory))
            save_costs(costs, path)
            return costs
    if log:
        log(f"measuring this machine's disk, memory and kernel figures (cached in {path})")
    costs = measure_costs(disk_directory or path.parent)
    save_costs(costs, path)
    return costs


def measure_costs(disk_directory: Path) -> Costs:
    from memwise.kernels.bandwidth import read_bandwidth_bytes_per_s

    disk, direct = disk_read_bandwidth(disk_directory)
    gemv, few, gemm, prefill = kernel_rates()
    busy_disk, beside = overlap_figures(disk_directory)
    per_head, attention = attention_figures()
    notes = [] if direct else [f"{disk_directory}: O_DIRECT refused; the file's pages were dropped from the "
                               "cache before reading instead"]
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:    # other processes took cores: every rate below is low by as much
        notes.append(f"measured while busy: load average {load:.1f} on {cores} cores")
    return Costs(machine=machine_id(), disk_read_bytes_per_s=disk,
                 memory_read_bytes_per_s=read_bandwidth_bytes_per_s(refresh=True), gemv_bytes_per_s=gemv,
                 gemm_bytes_per_s=gemm, prefill_gemm_bytes_per_s=prefill, few_rows_bytes_per_s=few,
                 disk_read_busy_bytes_per_s=busy_disk, products_beside_reads=beside,
                 attention_bytes_per_s=attention, attention_s_per_head=per_head, disk_direct=direct,
                 disk_directory=str(disk_directory), measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 notes=notes)


def disk_read_bandwidth(directory: Path, size: int = DISK_FILE_BYTES, passes: int = 2) -> tuple[float, bool]:
    """(bytes/s, O_DIRECT used) of reading a `size`-byte file written in `directory` (deleted after),
    best of `passes`. Where O_DIRECT is refused (tmpfs, some overlay filesystems) the file's cached
    pages are dropped with posix_fadvise before a plain read, and the flag says so."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CostsError(f"{directory}: cannot create the directory for the disk test ({e.strerror or e})") from None
    from memwise.offload.stream import AlignedBuffer

    path = directory / f".memwise-disk-test-{os.getpid()}"
    # The stream's own kind of buffer: on the EPYC VM, O_DIRECT reads into private huge-page memory
    # ran at 3.2-3.5 GB/s and into shared 4 KiB pages (mmap's default) at 1.4, so a probe with
    # another buffer measures another disk (docs/offload-plan.md).
    buffer = AlignedBuffer.allocate(DISK_CHUNK).view
    try:
        _write_test_file(path, size, buffer)
        best, direct = 0.0, True
        for _ in range(passes):
            seconds, direct = _timed_read(path, buffer)
            best = max(best, size / seconds)
        return best, direct
    except OSError as e:
        raise CostsError(f"{directory}: cannot write and read a {size >> 20} MiB test file "
                         f"({e.strerror or e})") from None
    finally:
        path.unlink(missing_ok=True)


def _write_test_file(path: Path, size: int, buffer: memoryview) -> None:
    buffer[:] = os.urandom(DISK_CHUNK)      # incompressible, so a compressing filesystem reads it all
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // DISK_CHUNK):
            os.write(fd, buffer)
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed_read(path: Path, buffer: memoryview, stop: Any = None, count: list[int] | None = None) -> tuple[float, bool]:
    """(seconds, O_DIRECT used) of reading `path` once into `buffer`, chunk by chunk (until `stop` is
    set, when given); `count[0]` gains the bytes as they arrive."""
    direct = hasattr(os, "O_DIRECT")
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        direct = False
        fd = os.open(path, os.O_RDONLY)
    try:
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        offset = 0
        while (stop is None or not stop.is_set()) and (n := os.preadv(fd, [buffer], offset)) > 0:
            offset += n
            if count is not None:
                count[0] += n
        return time.perf_counter() - start, direct
    finally:
        os.close(fd)


def _linear(scheme: str) -> Any:
    """One [rows, cols] linear of `scheme` with random weights, as the decoder family holds it."""
    import torch

    rows, cols = MATRIX_SHAPE
    w = torch.randn(rows, cols) * 0.02
    if scheme == "float32":
        from memwise.models.decoder.dense import DenseLinear
        linear = DenseLinear(cols, rows, bias=False)
        with torch.no_grad():
            linear.weight.copy_(w)
        return linear.requires_grad_(False)
    from memwise.models.decoder.quantized import LINEARS
    linear = LINEARS[scheme](cols, rows, bias=False)
    linear.fill_rows(0, w)
    return linear


def _module_bytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _copies(scheme: str, count: int | None = None) -> tuple[list[Any], int]:
    """Copies of one `scheme` linear that together exceed twice the last-level cache (or `count`),
    and the bytes of one."""
    from memwise.kernels.bandwidth import dram_buffer_bytes

    first = _linear(scheme)
    size = _module_bytes(first)
    count = count or max(2, -(-dram_buffer_bytes() // size))
    return [first] + [copy.deepcopy(first) for _ in range(count - 1)], size


def kernel_rates(schemes: tuple[str, ...] = KERNEL_SCHEMES, repeats: int = 3) -> tuple[dict[str, float], ...]:
    """Weight bytes/s of each scheme at batch 1, FEW_ROWS_BATCH, GEMM_BATCH and PREFILL_BATCH: best of
    `repeats` passes over copies of one matrix that together exceed twice the last-level cache (two
    copies for the compute-bound prefill size)."""
    import torch

    rates: tuple[dict[str, float], ...] = ({}, {}, {}, {})
    with torch.inference_mode():
        for scheme in schemes:
            copies, size = _copies(scheme)
            for found, batch in zip(rates, (1, FEW_ROWS_BATCH, GEMM_BATCH, PREFILL_BATCH)):
                used = copies if batch < PREFILL_BATCH else copies[:2]
                found[scheme] = size * len(used) / _best_pass(used, torch.randn(batch, MATRIX_SHAPE[1]), repeats)
            del copies
    return rates


def _best_pass(linears: list[Any], x: Any, repeats: int) -> float:
    for linear in linears[:2]:     # warm-up: thread pools, lazily built tables
        linear(x)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for linear in linears:
            linear(x)
        best = min(best, time.perf_counter() - start)
    return best


def overlap_figures(directory: Path, seconds: float = BESIDE_READS_SECONDS) -> tuple[float, float]:
    """(disk bytes/s, products' speed as a fraction of their speed alone) while a thread reads a test
    file in `directory` as the layer stream does and float32 products of GEMM_BATCH tokens run on every
    core: a streamed layer's read and the resident layers' products share the machine."""
    import threading
    import torch
    from memwise.offload.stream import AlignedBuffer

    path = Path(directory) / f".memwise-overlap-test-{os.getpid()}"
    buffer = AlignedBuffer.allocate(DISK_CHUNK).view
    stop, read = threading.Event(), [0]

    def reader() -> None:
        while not stop.is_set():
            _timed_read(path, buffer, stop, read)

    try:
        _write_test_file(path, DISK_FILE_BYTES, buffer)
        with torch.inference_mode():
            copies, size = _copies("float32")
            x = torch.randn(GEMM_BATCH, MATRIX_SHAPE[1])
            alone = _best_pass(copies, x, 2)
            passes = max(2, math.ceil(seconds / alone))
            thread = threading.Thread(target=reader, name="memwise-overlap-probe", daemon=True)
            thread.start()
            while read[0] == 0 and thread.is_alive():       # the reads are running before the products start
                time.sleep(0.001)
            start, before = time.perf_counter(), read[0]
            beside = _best_pass(copies, x, passes)
            elapsed, got = time.perf_counter() - start, read[0] - before
            stop.set()
            thread.join()
        return got / elapsed, min(1.0, alone / beside)
    except OSError as e:
        raise CostsError(f"{directory}: cannot write and read a {DISK_FILE_BYTES >> 20} MiB test file "
                         f"({e.strerror or e})") from None
    finally:
        stop.set()
        path.unlink(missing_ok=True)


def attention_figures(batch: int = GEMM_BATCH, heads: int = 32, head_dim: int = 64,
                      repeats: int = 3) -> tuple[float, float]:
    """(seconds per sequence and head, KV bytes/s) of a decode step's attention: torch's
    scaled_dot_product_attention, one query per sequence, over float32 keys and values sliced from a
    longer cache as DecoderCache hands them over. Timed at a short cache (8 slots) and a long one,
    each call on another cache, so that together they exceed twice the last-level cache (a model's
    caches are cold: its weights went through the cache since): the line through the two times."""
    per_slot = 2 * batch * heads * head_dim * 4
    lengths = (8, 256)
    short, long = (_cold_attention_s(batch, heads, head_dim, length, repeats) for length in lengths)
    per_byte = max((long - short) / (per_slot * (lengths[1] - lengths[0])), 1e-15)
    per_head = max(short - per_byte * per_slot * lengths[0], 0.0) / (batch * heads)
    return per_head, 1 / per_byte


def _cold_attention_s(batch: int, heads: int, head_dim: int, length: int, repeats: int) -> float:
    import torch
    import torch.nn.functional as F
    from memwise.kernels.bandwidth import dram_buffer_bytes

    count = max(2, -(-dram_buffer_bytes() // (2 * batch * heads * head_dim * 4 * length)))
    caches = [tuple(torch.randn(batch, heads, length + 8, head_dim)[:, :, :length] for _ in range(2))
              for _ in range(count)]
    query = torch.randn(batch, 1, heads, head_dim).transpose(1, 2)
    best = math.inf
    with torch.inference_mode():
        for k, v in caches[:2]:
            F.scaled_dot_product_attention(query, k, v)
        for _ in range(repeats):
            start = time.perf_counter()
            for k, v in caches:
                F.scaled_dot_product_attention(query, k, v)
            best = min(best, (time.perf_counter() - start) / count)
    return best
