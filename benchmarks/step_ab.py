"""Compare variants of the fused decode step's C source, in alternating rounds.

Timings on a shared VM drift by 20-40% from minute to minute, so two variants timed one after the
other can differ by more than the change being measured.  This script builds one copy of memwise
per variant of one file of the C source (--part, a path in the repository, by default the step's
hgrn_step.h; the first variant is usually the repository's own), starts a worker process per copy that loads the
preset once, and then asks the workers in turn, round after round (the order reversed every other
round), for the median of a number of steps.  It prints, per
variant, the median of its round medians and the median of its per-round ratio to the first
variant: a ratio below 1 is faster.

    python benchmarks/step_ab.py mmfree-370m --batch 16 src/memwise/models/hgrn_bit/csrc/hgrn_step.h /tmp/variant.h
    python benchmarks/step_ab.py mmfree-370m --batch 16 --part src/memwise/kernels/csrc/products.h \
        src/memwise/kernels/csrc/products.h /tmp/p.h

Needs a C compiler with OpenMP, like the package build.  Nothing else should run on the machine
meanwhile.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_phases import ROOT, SETUP, SOURCE, build_copy  # noqa: E402

# Loads the preset once, then answers each line (a number of steps) with their median in ms.
WORKER = SETUP + r"""
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t0 = time.perf_counter(); decoder.step(ids, state); times.append(time.perf_counter() - t0)
    times.sort()
    print(times[len(times) // 2] * 1e3, flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a MatMul-free preset name, e.g. mmfree-370m")
    parser.add_argument("sources", nargs="+", type=Path, help="variants of the part (the first is the baseline)")
    parser.add_argument("--part", type=Path, default=SOURCE,
                        help=f"the source file (a path in the repository) that each variant replaces (default {SOURCE})")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=40, help="steps per round and variant")
    args = parser.parse_args()
    if args.batch < 1 or args.rounds < 1 or args.steps < 1:
        parser.error("--batch, --rounds and --steps must be at least 1")
    if len(args.sources) < 2:
        parser.error("give at least two sources to compare")
    if not (ROOT / args.part).is_file():
        parser.error(f"--part {args.part}: no such file in the repository")
    texts = []
    for source in args.sources:
        try:
            texts.append(source.read_text())
        except OSError as error:
            parser.error(f"{source}: {error.strerror}")
    with tempfile.TemporaryDirectory(prefix="memwise-ab-") as tmp:
        workers = []
        try:
            for k, text in enumerate(texts):
                copy = Path(tmp) / str(k)
                failure = build_copy(copy, {args.part: text})
                if failure is not None:
                    sys.stderr.write(failure)
                    print(f"step_ab: building {args.sources[k]} failed", file=sys.stderr)
                    return 1
                env = {**os.environ, "PYTHONPATH": str(copy / "src")}
                workers.append(subprocess.Popen([sys.executable, "-c", WORKER, args.model, str(args.batch)],
                                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            for k, worker in enumerate(workers):
                if worker.stdout.readline().strip() != "ready":
                    print(f"step_ab: the worker for {args.sources[k]} did not start", file=sys.stderr)
                    return 1
            medians: list[list[float]] = [[] for _ in workers]
            for r in range(args.rounds):
                order = range(len(workers)) if r % 2 == 0 else reversed(range(len(workers)))
                for k in order:
                    workers[k].stdin.write(f"{args.steps}\n")
                    workers[k].stdin.flush()
                    medians[k].append(float(workers[k].stdout.readline()))
        finally:
            for worker in workers:
                if worker.stdin:
                    worker.stdin.close()
                worker.wait()
    print(f"{args.model} batch {args.batch}: {args.rounds} rounds of {args.steps} steps per variant")
    for k, source in enumerate(args.sources):
        ratios = [a / b for a, b in zip(medians[k], medians[0])]
        print(f"{source}: median step {statistics.median(medians[k]):.3f} ms, "
              f"ratio to {args.sources[0].name} {statistics.median(ratios):.3f} "
              f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
