"""Whether this machine's speed moves under a running process: the fused decode step's median over
blocks of steps, and between blocks the VPDPBUSD rate of benchmarks/vnni_peak.c (register-only work).

    gcc -O2 -fopenmp benchmarks/vnni_peak.c -o /tmp/vnni_peak
    MEMWISE_FIXED_THREADS=1 PYTHONPATH=src python benchmarks/step_modes.py [--model preset:mmfree-370m]
        [--batch 16] [--threads 2] [--blocks 14] [--steps 40] [--vnni /tmp/vnni_peak]

On the 2-core VMs the same step has run at two speeds within one process, switching after seconds
or minutes, while the register-only rate stayed put: the step then waits on memory, not on the
core's clock. A benchmark that compares two processes (a server against an offline run) can land
one in each; docs/serving.md shows what that does to a ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import memwise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preset:mmfree-370m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=14)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vnni", type=Path, default=Path("/tmp/vnni_peak"), help="built vnni_peak (skipped if missing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = memwise.load(args.model).module
    ids = torch.randint(0, model.spec.vocab_size, (args.batch, 1), generator=torch.Generator().manual_seed(0))
    mask, cache = torch.ones_like(ids, dtype=torch.bool), model.new_cache(args.batch)
    with torch.inference_mode():
        for _ in range(5):
            model(ids, cache, mask)
        for _ in range(args.blocks):
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                model(ids, cache, mask)
                times.append((time.perf_counter() - start) * 1e3)
            line = f"{time.strftime('%H:%M:%S', time.gmtime())} decode step median {statistics.median(times):.1f} ms"
            if args.vnni.exists():
                out = subprocess.run([str(args.vnni)], env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                                     capture_output=True, text=True).stdout.split()
                line += f", VPDPBUSD {out[2]} G/s"
            print(line, flush=True)


if __name__ == "__main__":
    main()
