"""Kernel benchmark: the int8 x ternary product on the real layer shapes of the MatMul-free models.

Every timed call reads a copy of the packed matrix that has not been touched for at least an
arena's worth of other data (twice the last-level cache, like the bandwidth test), so single-row
(decode) figures are DRAM-streaming figures and can be set against the measured read bandwidth:
decode tokens/s can be no more than bandwidth / bytes of weights read per token.

Run it with `python -m memwise.bench.kernels` or `memwise bench --kernels`.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from dataclasses import dataclass

import torch

from memwise import kernels
from memwise.kernels.bandwidth import dram_buffer_bytes
from memwise.kernels.packed import BLOCK_BYTES, codes_buffer, padded_cols

# The model sizes whose shapes are benchmarked: the released MatMul-free presets.
MODEL_SIZES = ("370m", "1.3b", "2.7b")


def layer_shapes(size: str) -> list[tuple[str, int, int]]:
    """(matrices, N rows, K cols) of each distinct BitLinear shape of preset mmfree-SIZE, read from
    the family's tensor layout."""
    from memwise.models import hgrn_bit
    from memwise.presets import PRESETS
    from memwise.source import resolve_model
    preset = f"mmfree-{size}"
    if preset not in PRESETS:
        sizes = sorted(name.removeprefix("mmfree-") for name in PRESETS if name.startswith("mmfree-"))
        raise kernels.KernelInputError(f"unknown model size {size!r} (choose from {', '.join(sizes)})")
    spec = resolve_model(f"preset:{preset}").spec
    roles: dict[tuple[int, int], list[str]] = {}
    for slot in hgrn_bit.checkpoint_layout(spec):
        if slot.ternary:
            role = re.sub(r"^model\.layers\.\d+\.", "", slot.name).removesuffix(".weight")
            if role not in roles.setdefault(slot.shape, []):
                roles[slot.shape].append(role)
    return [(_group_name(names), rows, cols) for (rows, cols), names in roles.items()]


def _group_name(names: list[str]) -> str:
    """"attn.i_proj", "attn.f_proj" -> "attn.i_proj/f_proj"."""
    prefix = names[0].rpartition(".")[0]
    if len(names) > 1 and prefix and all(n.rpartition(".")[0] == prefix for n in names):
        return prefix + "." + "/".join(n.rpartition(".")[2] for n in names)
    return "/".join(names)


@dataclass
class _Arena:
    """One big buffer of valid packed codes; matrices are views at a cursor that keeps moving, so
    that each call reads memory the previous calls have pushed out of the caches."""

    data: torch.Tensor
    cursor: int = 0

    @classmethod
    def make(cls, nbytes: int, seed: int) -> "_Arena":
        gen = torch.Generator().manual_seed(seed)
        # Bytes whose four 2-bit fields are all valid codes (0, 1, 2): 81 of the 256 values.
        valid = torch.tensor([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3)
                              for c in range(3) for d in range(3)], dtype=torch.uint8)
        tile = valid[torch.randint(0, 81, (1 << 20,), generator=gen)]
        # The model's kind of memory (huge pages on Linux), so the figures are those a decode step sees.
        data = codes_buffer(-(-nbytes // tile.numel()) * tile.numel())
        data.view(-1, tile.numel()).copy_(tile.expand(data.numel() // tile.numel(), -1))
        return cls(data)

    def next_matrix(self, rows: int, row_bytes: int) -> torch.Tensor:
        size = rows * row_bytes
        if size > self.data.numel():
            raise kernels.KernelInputError(f"benchmark arena of {self.data.numel()} bytes cannot hold "
                                           f"a {rows}x{row_bytes} matrix")
        if self.cursor + size > self.data.numel():
            self.cursor = 0
        view = self.data[self.cursor:self.cursor + size].view(rows, row_bytes)
        # Start the next matrix on a fresh 4 KiB boundary.
        self.cursor += -(-size // 4096) * 4096
        return view


def _time_calls(fns: list, arena: _Arena, rows: int, row_bytes: int, calls: int) -> list[list[float]]:
    """Times per call of each fn, the fns called in turn (each round starting one further on), so
    that a machine that speeds up or slows down during the measurement moves every path alike;
    timed one path after the other, the later one often measured faster on the project's VM."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn(arena.next_matrix(rows, row_bytes))  # page-in and thread start-up, not timed
    for r in range(calls):
        for i in range(len(fns)):
            k = (r + i) % len(fns)
            packed = arena.next_matrix(rows, row_bytes)
            start = time.perf_counter()
            fns[k](packed)
            times[k].append(time.perf_counter() - start)
    return times


def run_kernel_bench(sizes: tuple[str, ...] = MODEL_SIZES,
                     batch_sizes: tuple[int, ...] = (1,), repeats: int = 20,
                     isas: list[str] | None = None, seed: int = 0,
                     arena_bytes: int | None = None) -> list[dict]:
    """Time the product per layer shape, batch size (activation rows M) and ISA path.

    Each record: size, matrix, rows (N), cols (K), batch (M), isa, threads, calls, seconds (median
    per call), best_seconds, weight_bytes (packed bytes read per call), gbps (weight bytes per
    second at the median), best_gbps, gops (2*M*N*K integer ops per second at the median),
    bandwidth_gbps (measured read bandwidth) and pct_of_bandwidth (gbps / bandwidth_gbps).

    Without the C extension the only path is the PyTorch reference, timed the same way.
    """
    if repeats < 1:
        raise kernels.KernelInputError(f"repeats must be at least 1, got {repeats}")
    for m in batch_sizes:
        if m < 1:
            raise kernels.KernelInputError(f"batch sizes must be at least 1, got {m}")
    isas = list(isas) if isas is not None else kernels.isa_paths()
    bandwidth = kernels.read_bandwidth_bytes_per_s()
    shapes = [(size, name, n, k) for size in sizes for name, n, k in layer_shapes(size)]
    largest = max(n * padded_cols(k) // 4 for _, _, n, k in shapes)
    arena = _Arena.make(max(arena_bytes or dram_buffer_bytes(), 2 * largest), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    threads = torch.get_num_threads()
    records = []
    for size, name, n, k in shapes:
        row_bytes = padded_cols(k) // 4
        weight_bytes = n * row_bytes
        for m in batch_sizes:
            q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
            out = torch.empty((m, n), dtype=torch.int32)
            # The AMX path runs the AVX-512 VNNI kernel for so few rows.
            paths = [isa for isa in isas
                     if not (isa == "amx" and kernels.HAVE_C and m < kernels._c.AMX_MIN_ROWS)]
            timings = _time_calls([_product(isa, q, n, k, out) for isa in paths], arena, n, row_bytes,
                                  repeats)
            for isa, times in zip(paths, timings):
                median, best = statistics.median(times), min(times)
                records.append({
                    "size": size, "matrix": name, "rows": n, "cols": k, "batch": m, "isa": isa,
                    "threads": threads, "calls": len(times), "seconds": median,
                    "best_seconds": best, "weight_bytes": weight_bytes,
                    "gbps": weight_bytes / median / 1e9, "best_gbps": weight_bytes / best / 1e9,
                    "gops": 2.0 * m * n * k / median / 1e9, "bandwidth_gbps": bandwidth / 1e9,
                    "pct_of_bandwidth": 100.0 * weight_bytes / median / bandwidth,
                })
    return records


def _product(isa: str, q: torch.Tensor, n: int, k: int, out: torch.Tensor):
    """The C call itself, inputs validated once here, so that the timing is the kernel's."""
    if not kernels.HAVE_C:
        from memwise.kernels.packed import TernaryMatrix, ternary_matmul_reference

        def reference(packed: torch.Tensor) -> None:
            out.copy_(ternary_matmul_reference(q, TernaryMatrix(packed, 1.0, n, k).ternary()))
        return reference
    ident = kernels.isa_id(kernels.resolve_isa(isa))
    threads = torch.get_num_threads()
    nb = padded_cols(k) // 4 // BLOCK_BYTES

    def c_call(packed: torch.Tensor) -> None:
        kernels._c.matmul(ident, packed.data_ptr(), n, nb, q.data_ptr(), q.shape[0], k,
                          out.data_ptr(), threads)
    return c_call


def format_kernel_bench(records: list[dict]) -> str:
    """A markdown table of run_kernel_bench records."""
    if not records:
        return "(no kernel benchmark records)"
    bw = records[0]["bandwidth_gbps"]
    lines = [
        f"Measured memory read bandwidth: {bw:.1f} GB/s ({records[0]['threads']} threads). "
        "GB/s = packed weight bytes / median time per call, weights cold in cache.",
        "",
        "| model | matrix | N x K | M | isa | time/call | GB/s | % of read bw | int8 GOP/s |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['size']} | {r['matrix']} | {r['rows']} x {r['cols']} | {r['batch']} | {r['isa']} "
            f"| {_duration(r['seconds'])} | {r['gbps']:.2f} | {r['pct_of_bandwidth']:.0f}% "
            f"| {r['gops']:.1f} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark memwise's ternary kernels.")
    parser.add_argument("--sizes", default=",".join(MODEL_SIZES), help="comma-separated model sizes")
    parser.add_argument("--batch", default="1", help="comma-separated activation row counts")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--isa", default=None, help="comma-separated ISA paths (default: all)")
    args = parser.parse_args(argv)
    records = run_kernel_bench(
        sizes=tuple(s for s in args.sizes.split(",") if s),
        batch_sizes=tuple(int(b) for b in args.batch.split(",") if b),
        repeats=args.repeats,
        isas=args.isa.split(",") if args.isa else None)
    print(format_kernel_bench(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
