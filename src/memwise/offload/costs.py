"""The offload planner's cost model: this machine's figures, measured once and cached.

    disk_read_bytes_per_s      sequential read of a file with O_DIRECT (the page cache bypassed, so
                               that a figure is the disk's), in 16 MiB requests into an aligned buffer
    memory_read_bytes_per_s    memwise.kernels.bandwidth's all-thread read bandwidth
    attention_s_per_head       a decode step's attention (torch's scaled_dot_product_attention, one
    attention_bytes_per_s      query per sequence, float32 cache, cold): seconds per sequence and head,
                               plus the KV bytes it reads at this rate (below the memory figure)
    gemv_bytes_per_s[S]        weight bytes per second of one token through a layer's linear in
                               scheme S (float32, int8, int4, nf4), as the decoder runs it (float32:
                               memwise's DenseLinear): the decode product at batch 1
    few_rows_bytes_per_s[S]    the same at `few_rows_batch` (8) tokens: the most rows the decode
                               kernels take (memwise.kernels.dense.MAX_ROWS); beyond, float32 goes to
                               torch's GEMM, so the curve bends there
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
--remeasure` measures again (memwise.offload.probes measures). The planner itself
(memwise.offload.plan) takes a Costs: tests build one by hand.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    attention_bytes_per_s: float = 0.0          # 0: not measured (the memory figure stands)
    attention_s_per_head: float = 0.0
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
                        attention_bytes_per_s=float(data["attention_bytes_per_s"]),
                        attention_s_per_head=float(data["attention_s_per_head"]),
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
        for name in ("attention_bytes_per_s", "attention_s_per_head"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise CostsError(f"{where}: {name} should be a number >= 0, found {getattr(self, name)!r}")
        if not (math.isfinite(self.disk_read_busy_bytes_per_s) and self.disk_read_busy_bytes_per_s >= 0
                and 0 < self.products_beside_reads <= 1):
            raise CostsError(f"{where}: the overlap figures should be a rate >= 0 and a fraction in (0, 1], found "
                             f"{self.disk_read_busy_bytes_per_s!r} and {self.products_beside_reads!r}")

    @property
    def kv_read_bytes_per_s(self) -> float:
        """The rate at which a decode step's attention reads the KV cache (the memory figure where the
        attention figure was not measured)."""
        return self.attention_bytes_per_s or self.memory_read_bytes_per_s

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
