"""The offload planner's cost model: this machine's figures, measured once and cached.

    disk_read_bytes_per_s      sequential read of a file with O_DIRECT (the page cache bypassed, so
                               that a figure is the disk's), in 16 MiB requests into an aligned buffer
    memory_read_bytes_per_s    memwise.kernels.bandwidth's all-thread read bandwidth
    gemv_bytes_per_s[S]        weight bytes per second of one token through a layer's linear in
                               scheme S (float32, int8, int4, nf4), as the decoder runs it (float32:
                               memwise's DenseLinear): the decode product at batch 1
    few_rows_bytes_per_s[S]    the same at `few_rows_batch` (8) tokens: the most rows the decode
                               kernels take (memwise.kernels.dense.MAX_ROWS); beyond, float32 goes to
                               torch's GEMM, which ran at half the weight bytes/s at 8 rows here
    gemm_bytes_per_s[S]        weight bytes per second of `gemm_batch` (32) tokens through the same
                               matrices: a matrix of W bytes takes W / gemm_bytes_per_s seconds for
                               gemm_batch tokens, so one token costs W / (gemm_batch x gemm_bytes_per_s)
    prefill_gemm_bytes_per_s[S]  the same at `prefill_batch` (256) tokens: a prefill's products are
                               that large, and per token they run 2-3x faster than at 32 here
    disk_read_busy_bytes_per_s  the disk figure while products run on every core (the I/O thread
                               shares the cores with them)
    products_beside_reads      the products' speed while the I/O thread reads, as a fraction of
                               their speed alone (<= 1): the two overlap, but not for free

The products up to batch 32 run over matrices whose total size is at least twice the last-level
cache, so that the figures are those of weights streamed from memory, as a model's are (the
prefill-sized product is compute-bound: two copies suffice). The overlap figures come from one
probe: float32 products of 32 tokens alone, then beside a thread reading a test file as the layer
stream does. The figures are written to $XDG_CACHE_HOME/memwise/costs-<machine>.json (~/.cache
when unset; <machine>: the CPU model and core count) and read back by later runs; `memwise plan
--remeasure` measures again. The planner itself (memwise.offload.plan) takes a Costs: tests build
one by hand.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from memwise.errors import MemwiseError

KERNEL_SCHEMES = ("float32", "int8", "int4", "nf4")
FEW_ROWS_BATCH = 8
GEMM_BATCH = 32
PREFILL_BATCH = 256
DISK_FILE_BYTES = 256 << 20
DISK_CHUNK = 16 << 20
ALIGN = 4096
MATRIX_SHAPE = (4096, 4096)     # a 7B model's attention projection: rows x columns
FORMAT_VERSION = 3
BESIDE_READS_SECONDS = 1.5     # the products' time in the overlap probe


class CostsError(MemwiseError):
    """The cost figures cannot be measured or read (a directory that cannot hold the test file, a bad cache)."""


@dataclass(frozen=True)
class Costs:
    machine: str
    disk_read_bytes_per_s: float
    memory_read_bytes_per_s: float
    gemv_bytes_per_s: dict[str, float]
    gemm_bytes_per_s: dict[str, float]
    prefill_gemm_bytes_per_s: dict[str, float]
    few_rows_bytes_per_s: dict[str, float] = field(default_factory=dict)    # empty: not measured
    disk_read_busy_bytes_per_s: float = 0.0     # 0: not measured (the idle figure stands)
    products_beside_reads: float = 1.0
    few_rows_batch: int = FEW_ROWS_BATCH
    gemm_batch: int = GEMM_BATCH
    prefill_batch: int = PREFILL_BATCH
    disk_direct: bool = True            # False: the filesystem refused O_DIRECT (the figure may include cache)
    disk_directory: str = ""
    measured_at: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Costs":
        """A Costs from to_json's dict; anything else is a CostsError naming `where`."""
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise CostsError(f"{where}: not a memwise cost file of format {FORMAT_VERSION}")
        try:
            rates = {name: {str(k): float(v) for k, v in data[name].items()} for name in
                     ("gemv_bytes_per_s", "few_rows_bytes_per_s", "gemm_bytes_per_s", "prefill_gemm_bytes_per_s")}
            costs = cls(machine=str(data["machine"]), disk_read_bytes_per_s=float(data["disk_read_bytes_per_s"]),
                        memory_read_bytes_per_s=float(data["memory_read_bytes_per_s"]), **rates,
                        disk_read_busy_bytes_per_s=float(data["disk_read_busy_bytes_per_s"]),
                        products_beside_reads=float(data["products_beside_reads"]),
                        few_rows_batch=int(data["few_rows_batch"]),
                        gemm_batch=int(data["gemm_batch"]), prefill_batch=int(data["prefill_batch"]),
                        disk_direct=bool(data["disk_direct"]),
                        disk_directory=str(data.get("disk_directory", "")),
                        measured_at=str(data.get("measured_at", "")), notes=[str(n) for n in data.get("notes", [])])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CostsError(f"{where}: malformed cost file ({type(e).__name__}: {e})") from None
        costs.check(where)
        return costs

    def check(self, where: str = "costs") -> None:
        figures = {"disk_read_bytes_per_s": self.disk_read_bytes_per_s,
                   "memory_read_bytes_per_s": self.memory_read_bytes_per_s,
                   **{f"gemv_bytes_per_s[{k}]": v for k, v in self.gemv_bytes_per_s.items()},
                   **{f"few_rows_bytes_per_s[{k}]": v for k, v in self.few_rows_bytes_per_s.items()},
                   **{f"gemm_bytes_per_s[{k}]": v for k, v in self.gemm_bytes_per_s.items()},
                   **{f"prefill_gemm_bytes_per_s[{k}]": v for k, v in self.prefill_gemm_bytes_per_s.items()}}
        for name, value in figures.items():
            if not (math.isfinite(value) and value > 0):
                raise CostsError(f"{where}: {name} should be a positive number of bytes/s, found {value!r}")
        missing = [s for s in KERNEL_SCHEMES if not all(s in rates for rates in (
            self.gemv_bytes_per_s, self.gemm_bytes_per_s, self.prefill_gemm_bytes_per_s))
            or self.few_rows_bytes_per_s and s not in self.few_rows_bytes_per_s]
        if missing or not 1 < self.few_rows_batch < self.gemm_batch < self.prefill_batch:
            raise CostsError(f"{where}: kernel figures missing for {', '.join(missing) or 'the batch sizes'}")
        if not (math.isfinite(self.disk_read_busy_bytes_per_s) and self.disk_read_busy_bytes_per_s >= 0
                and 0 < self.products_beside_reads <= 1):
            raise CostsError(f"{where}: the overlap figures should be a rate >= 0 and a fraction in (0, 1], found "
                             f"{self.disk_read_busy_bytes_per_s!r} and {self.products_beside_reads!r}")

    @property
    def overlapped_disk_bytes_per_s(self) -> float:
        """The disk figure of reads that run beside the products (the measured one when there is one)."""
        return self.disk_read_busy_bytes_per_s or self.disk_read_bytes_per_s


def machine_id() -> str:
    """'<cpu model>-<cores>c' as a file-name-safe slug: the cache key of this machine's figures."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1]
                break
    except OSError:
        pass
    if not model:
        import platform
        model = platform.processor() or platform.machine() or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return f"{slug}-{os.cpu_count() or 1}c"


def cache_path(cache_dir: Path | None = None) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memwise"
    return (cache_dir or base) / f"costs-{machine_id()}.json"


def save_costs(costs: Costs, path: Path) -> None:
    """Write atomically: a temporary name renamed over the file, so a killed run leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(costs.to_json(), indent=1) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_costs(path: Path) -> Costs:
    from memwise.json_file import read_json
    return Costs.from_json(read_json(path, CostsError), str(path))


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
    notes = [] if direct else [f"{disk_directory}: O_DIRECT refused; the file's pages were dropped from the "
                               "cache before reading instead"]
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:    # other processes took cores: every rate below is low by as much
        notes.append(f"measured while busy: load average {load:.1f} on {cores} cores")
    return Costs(machine=machine_id(), disk_read_bytes_per_s=disk,
                 memory_read_bytes_per_s=read_bandwidth_bytes_per_s(refresh=True), gemv_bytes_per_s=gemv,
                 gemm_bytes_per_s=gemm, prefill_gemm_bytes_per_s=prefill, few_rows_bytes_per_s=few,
                 disk_read_busy_bytes_per_s=busy_disk, products_beside_reads=beside, disk_direct=direct,
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
