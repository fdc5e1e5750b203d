"""A/B of built int8 product extensions on a prefill's products: int8_linear's C call (activation
quantization, product, rescale) on opt-1.3b's matrix shapes at several activation-row counts.

Each argument is a built _int8 extension (.so), e.g. main's, copied aside before a rebuild, and
this tree's; all are loaded into this one process and called in turn on the same random weights
and activations, the order reversed every other round, so that a shared machine's load falls on
every variant alike. Prints the median GOP/s (2 * M * N * K per call) per shape and variant and
the ratio of medians to the first variant (above 1 is faster), then the same for the fastest round
(on a shared machine, the round least disturbed). Every variant's output is checked
equal to the first's.

    cp src/memwise/kernels/_int8*.so /tmp/int8_main.so      # before rebuilding
    PYTHONPATH=src python benchmarks/int8_gemm_ab.py /tmp/int8_main.so src/memwise/kernels/_int8*.so
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from memwise import kernels
from memwise.kernels.int8 import Int8Matrix

SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192)]  # (N, K): attention out, fc1, fc2 of opt-1.3b


def load(path: str, index: int):
    spec = importlib.util.spec_from_file_location("_int8", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.label = f"#{index}"
    return module


def call(module, weight: Int8Matrix, x: torch.Tensor, out: torch.Tensor, isa: int, threads: int) -> float:
    start = time.perf_counter()
    module.linear(isa, weight.weight.data_ptr(), weight.row_sums.data_ptr(), weight.scale.data_ptr(), 0,
                  weight.rows, weight.weight.shape[1], x.data_ptr(), x.shape[0], weight.cols, out.data_ptr(), threads)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extensions", nargs="+")
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--isa", default=None, help="instruction-set path (default: the best)")
    args = parser.parse_args()
    modules = [load(path, i) for i, path in enumerate(args.extensions)]
    isa = kernels.isa_id(kernels.resolve_isa(args.isa))
    g = torch.Generator().manual_seed(0)
    print(f"isa {kernels.resolve_isa(args.isa)}, {args.threads} threads, {args.rounds} rounds")
    for n, k in SHAPES:
        weight = Int8Matrix.from_float(torch.randn(n, k, generator=g))
        for m in args.rows:
            x = torch.randn(m, k, generator=g)
            outs = [torch.empty(m, n) for _ in modules]
            times: list[list[float]] = [[] for _ in modules]
            for r in range(args.rounds + 1):
                order = range(len(modules)) if r % 2 == 0 else reversed(range(len(modules)))
                for i in order:
                    seconds = call(modules[i], weight, x, outs[i], isa, args.threads)
                    if r:                       # round 0 warms caches and threads
                        times[i].append(seconds)
            for i in range(1, len(modules)):
                assert torch.equal(outs[i], outs[0]), f"{modules[i].label} differs from {modules[0].label}"
            gops = [2 * m * n * k / statistics.median(t) / 1e9 for t in times]
            best = [2 * m * n * k / min(t) / 1e9 for t in times]
            cells = "  ".join(f"{mod.label} {v:6.1f} GOP/s x{v / gops[0]:.2f} (best {b:6.1f} x{b / best[0]:.2f})"
                              for mod, v, b in zip(modules, gops, best))
            print(f"N={n:5d} K={k:5d} M={m:4d}  {cells}", flush=True)


if __name__ == "__main__":
    main()
