"""Decode steps of a quantized decoder in two source trees (this one and, say, main's worktree with its
built extensions), in alternating rounds, so that the load of other processes on a shared machine
falls on both alike.

One worker process per tree loads the model once; each round every worker prefills a fresh cache and
times --steps batch-1 decode steps (the model's forward on one new token: products, attention, norms
and dispatch, without the sampling loop), and answers their median. The order of the workers is
reversed every other round. Prints each round and, per tree, the median of its round medians and
the median per-round ratio to the first tree (above 1: faster than the first tree).

    PYTHONPATH=src python benchmarks/quant_tree_ab.py /work/main/src src --quantize int8 --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import sys, time, torch, memwise
model, scheme, threads, prompt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
decoder = memwise.load(model, quantize=None if scheme == "float32" else scheme).module
ids = torch.randint(3, 50000, (1, prompt), generator=torch.Generator().manual_seed(0))
token, ones = torch.tensor([[17]]), torch.ones((1, 1), dtype=torch.bool)
print(memwise.__file__, flush=True)
for line in sys.stdin:
    with torch.inference_mode():
        cache = decoder.new_cache(1, prompt + steps + 1)
        decoder(ids, cache, torch.ones_like(ids, dtype=torch.bool), last_only=True)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            decoder(token, cache, ones, last_only=True)
            times.append(time.perf_counter() - start)
    print(sorted(times)[len(times) // 2] * 1e3, flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, type=Path, help="two src/ folders (the first is the baseline)")
    parser.add_argument("--model", default="preset:gpt2-medium")
    parser.add_argument("--quantize", default="int8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    workers = []
    for tree in args.trees:
        env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
        worker = subprocess.Popen([sys.executable, "-c", WORKER, args.model, args.quantize, str(args.threads),
                                   str(args.prompt), str(args.steps)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        print(f"{tree}: memwise from {worker.stdout.readline().strip()}", flush=True)
        workers.append(worker)
    rounds: list[list[float]] = []
    for r in range(args.rounds):
        order = list(range(len(workers)))[::-1 if r % 2 else 1]
        ms = [0.0] * len(workers)
        for i in order:
            workers[i].stdin.write("go\n")
            workers[i].stdin.flush()
            ms[i] = float(workers[i].stdout.readline())
        rounds.append(ms)
        print(f"round {r}: " + ", ".join(f"{t:.2f} ms" for t in ms) + f" | ratio {ms[0] / ms[1]:.2f}x", flush=True)
    for worker in workers:
        worker.stdin.close()
        worker.wait()
    for i, tree in enumerate(args.trees):
        median = statistics.median(row[i] for row in rounds)
        ratio = statistics.median(row[0] / row[i] for row in rounds)
        print(f"{tree}: median step {median:.2f} ms ({1e3 / median:.1f} tok/s), speed vs the first tree {ratio:.2f}x")


if __name__ == "__main__":
    main()
