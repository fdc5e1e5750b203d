"""Compare variants of the kernel library's C source on the GEMV of the MatMul-free layer shapes.

Like step_ab.py, for the products alone: builds one copy of memwise per variant (a file replacing
--part, by default src/memwise/kernels/csrc/products.h, and optional extra CFLAGS after an '@'),
loads every copy's kernel extension into this one process, and calls them in turn on cold weights
(the kernel bench's arena, so each call streams from DRAM), the order reversed every other round.
It prints, per shape and variant, the median GB/s of packed weights, its share of the measured read
bandwidth, and the ratio of medians to the first variant (above 1 is faster).  Every variant's
output is checked equal to the first's on the same weights.

    python benchmarks/kernel_ab.py /tmp/old_products.h src/memwise/kernels/csrc/products.h
    python benchmarks/kernel_ab.py --isa avx2 src/memwise/kernels/csrc/products.h \\
        'src/memwise/kernels/csrc/products.h@-DPF_FAR_BYTES=0'

Needs a C compiler with OpenMP, like the package build.  Nothing else should run meanwhile.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_phases import ROOT, build_copy  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
import torch  # noqa: E402

from memwise import kernels  # noqa: E402
from memwise.bench.kernels import _Arena, layer_shapes  # noqa: E402
from memwise.kernels.bandwidth import dram_buffer_bytes  # noqa: E402
from memwise.kernels.packed import BLOCK_BYTES, padded_cols  # noqa: E402


def load_extension(copy: Path):
    path = next((copy / "src" / "memwise" / "kernels").glob("_ternary*.so"))
    spec = importlib.util.spec_from_file_location("_ternary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(mods: list, ident: int, size: str, rounds: int, threads: int, bandwidth: float) -> None:
    arena = _Arena.make(dram_buffer_bytes(), 0)
    gen = torch.Generator().manual_seed(1)
    for _, n, k in layer_shapes(size):
        nb = padded_cols(k) // 128
        row_bytes = nb * BLOCK_BYTES
        q = torch.randint(-128, 128, (1, k), dtype=torch.int8, generator=gen)
        outs = [torch.empty((1, n), dtype=torch.int32) for _ in mods]
        times: list[list[float]] = [[] for _ in mods]
        for r in range(rounds + 1):  # round 0 warms up
            for i in (range(len(mods)) if r % 2 == 0 else reversed(range(len(mods)))):
                w = arena.next_matrix(n, row_bytes)
                start = time.perf_counter()
                mods[i].matmul(ident, w.data_ptr(), n, nb, q.data_ptr(), 1, k, outs[i].data_ptr(), threads)
                if r:
                    times[i].append(time.perf_counter() - start)
        w = arena.next_matrix(n, row_bytes)
        for i, mod in enumerate(mods):
            mod.matmul(ident, w.data_ptr(), n, nb, q.data_ptr(), 1, k, outs[i].data_ptr(), threads)
            if not torch.equal(outs[i], outs[0]):
                raise SystemExit(f"kernel_ab: variant {i} differs from variant 0 on {n} x {k}")
        gbps = [n * row_bytes / statistics.median(t) / 1e9 for t in times]
        cells = [f"{g:6.2f} GB/s {100 * g * 1e9 / bandwidth:4.0f}% x{g / gbps[0]:.3f}" for g in gbps]
        print(f"{size} {n:6d} x {k:5d} | " + " | ".join(cells), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="variants of the part, FILE or FILE@CFLAGS (the first is the baseline)")
    parser.add_argument("--part", type=Path, default=Path("src/memwise/kernels/csrc/products.h"))
    parser.add_argument("--isa", default="avx2")
    parser.add_argument("--sizes", default="2.7b", help="comma-separated model sizes")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the read bandwidth is measured on as many threads
    ident = kernels.isa_id(kernels.resolve_isa(args.isa))
    with tempfile.TemporaryDirectory(prefix="memwise-kernel-ab-") as tmp:
        mods = []
        for k, source in enumerate(args.sources):
            path, _, cflags = source.partition("@")
            copy = Path(tmp) / str(k)
            failure = build_copy(copy, {args.part: Path(path).read_text()}, cflags)
            if failure is not None:
                sys.stderr.write(failure)
                print(f"kernel_ab: building {source} failed", file=sys.stderr)
                return 1
            mods.append(load_extension(copy))
        bandwidth = kernels.read_bandwidth_bytes_per_s()
        print(f"isa {args.isa}, {args.threads} threads, {args.rounds} rounds, read bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s; variants: " + ", ".join(args.sources))
        for size in args.sizes.split(","):
            compare(mods, ident, size, args.rounds, args.threads, bandwidth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
