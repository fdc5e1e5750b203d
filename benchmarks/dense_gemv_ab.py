"""A/B of the float32 decode GEMV (memwise.kernels.dense.f32_linear) against torch's F.linear on
gpt2-medium's shapes, one activation row (batch-1 decode) by default.

Each shape gets enough copies of its matrix to exceed the last-level cache, and calls cycle through
them, so every call streams its weights from memory as a decode step does. The two engines alternate
in rounds; the median time per call and the GB/s it implies are printed, next to the machine's read
bandwidth (memwise.kernels.read_bandwidth_bytes_per_s). Timings move with the load of other processes:
compare the two columns of one run.

    PYTHONPATH=src python benchmarks/dense_gemv_ab.py [--rows 1] [--rounds 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from memwise.kernels import last_level_cache_bytes, read_bandwidth_bytes_per_s
from memwise.kernels.dense import f32_linear

SHAPES = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096), (50257, 1024)]   # [N, K]: qkv, out, up, down, lm_head


def per_call_s(fn, x, weights, biases, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        fn(x, weights[i % len(weights)], biases[i % len(biases)])
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="activation rows (tokens) per product")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = last_level_cache_bytes() or 32 << 20
    print(f"threads {torch.get_num_threads()}, rows {args.rows}, read bandwidth "
          f"{read_bandwidth_bytes_per_s() / 1e9:.1f} GB/s, last-level cache {cache >> 20} MiB")
    print(f"{'N x K':>12} {'torch us':>10} {'GB/s':>6} {'memwise us':>11} {'GB/s':>6} {'speedup':>8}")
    generator = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        copies = max(1, -(-2 * cache // (4 * n * k)))
        weights = [torch.randn(n, k, generator=generator) for _ in range(copies)]
        biases = [torch.randn(n, generator=generator) for _ in range(copies)]
        x = torch.randn(args.rows, k, generator=generator)
        calls = max(4 * copies, 8)
        times: dict[str, list[float]] = {"torch": [], "memwise": []}
        for fn in (F.linear, f32_linear):   # warm-up
            per_call_s(fn, x, weights, biases, copies)
        for _ in range(args.rounds):
            times["torch"].append(per_call_s(F.linear, x, weights, biases, calls))
            times["memwise"].append(per_call_s(f32_linear, x, weights, biases, calls))
        t, m = statistics.median(times["torch"]), statistics.median(times["memwise"])
        print(f"{n:>6} x {k:<5} {t * 1e6:>10.0f} {4 * n * k / t / 1e9:>6.1f} {m * 1e6:>11.0f} "
              f"{4 * n * k / m / 1e9:>6.1f} {t / m:>7.2f}x")
        del weights, biases


if __name__ == "__main__":
    main()
