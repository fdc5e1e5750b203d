"""Compare instruction-set paths of the fused decode step, in alternating rounds, in one process.

The fused step of a preset runs on each path given (names as in memwise.kernels.isa_paths()),
round after round (the order reversed every other round), and the script prints per path the
median of its round medians and the median of its per-round ratio to the first path: below 1 is
faster.  Timings on a shared VM drift by 20-40% from minute to minute, so only paths timed in
alternation compare.

    python benchmarks/step_isa.py mmfree-2.7b avx512vnni avxvnni --batch 1 --rounds 12
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import memwise
from memwise import kernels
from memwise.models.hgrn_bit import fused_step as fused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a MatMul-free preset name, e.g. mmfree-2.7b")
    parser.add_argument("isas", nargs="+", help="paths to compare (the first is the baseline)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and path")
    args = parser.parse_args()
    if args.batch < 1 or args.rounds < 1 or args.steps < 1:
        parser.error("--batch, --rounds and --steps must be at least 1")
    available = kernels.isa_paths() if kernels.HAVE_C else []
    for isa in args.isas:
        if isa not in available:
            parser.error(f"path {isa!r} is not available here (available: {', '.join(available) or 'none'})")
    module = memwise.load(f"preset:{args.model}").module
    decoder = fused.FusedDecoder(module)
    state = torch.zeros((len(module.layers), args.batch, module.spec.hidden_size * module.spec.expand_ratio))
    ids = torch.ones((args.batch, 1), dtype=torch.long)
    for isa in args.isas:
        for _ in range(5):
            decoder.step(ids, state, isa=isa)
    medians: dict[str, list[float]] = {isa: [] for isa in args.isas}
    for r in range(args.rounds):
        for isa in args.isas if r % 2 == 0 else reversed(args.isas):
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                decoder.step(ids, state, isa=isa)
                times.append(time.perf_counter() - start)
            medians[isa].append(statistics.median(times) * 1e3)
    print(f"{args.model} batch {args.batch}: {args.rounds} rounds of {args.steps} steps per path")
    base = medians[args.isas[0]]
    for isa in args.isas:
        ratios = [a / b for a, b in zip(medians[isa], base)]
        print(f"{isa}: median step {statistics.median(medians[isa]):.3f} ms, ratio to {args.isas[0]} "
              f"{statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
