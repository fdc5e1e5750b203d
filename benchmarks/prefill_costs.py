"""What a prompt token and a decode row cost an HGRN-Bit model, in CPU time on one thread: the numbers
a serving schedule weighs (benchmarks/serve_profile.py measures the schedule itself).

    PYTHONPATH=src python benchmarks/prefill_costs.py [--model preset:mmfree-370m] [--rounds 4]

1. The ternary products alone (kernels.bitlinear, fused RMSNorm and int8 activations included) of
   layer 0's matrices and the lm_head, per activation row, for M = 1, 16, 32, 64, 128, 256 rows.
2. Whole forwards: B prompts of T tokens (the many-token path, last_only as the server runs it) per
   prompt token, and the fused decode step of B rows per row.

CPU time (time.process_time) on one thread, MEMWISE_FIXED_THREADS=1: on a machine that other jobs
share, wall time is mostly time spent descheduled, CPU time much less so (caches are still shared).
Each figure is the least of the rounds after one warm-up; the same matrix again and again stays in
cache, which a forward's matrices (read once per layer) do not.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

os.environ["MEMWISE_FIXED_THREADS"] = "1"

import torch  # noqa: E402

import memwise  # noqa: E402

ROWS = (1, 16, 32, 64, 128, 256)
PREFILLS = ((1, 8), (1, 16), (1, 32), (1, 64), (1, 128), (2, 64), (4, 64))
DECODES = (1, 16, 32)


def least_cpu(fn: Callable[[], Any], rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def product_costs(module: Any, rounds: int) -> dict[str, dict[int, float]]:
    """Microseconds of CPU per activation row, by matrix and M."""
    layer = module.layers[0]
    matrices = {"i_proj (f, g, o alike)": layer.attn.i_proj, "gate_proj": layer.mlp.gate_proj,
                "down_proj": layer.mlp.down_proj, "lm_head": module.lm_head}
    out: dict[str, dict[int, float]] = {}
    for name, bitlinear in matrices.items():
        out[name] = {}
        for m in ROWS:
            x = torch.randn(m, bitlinear.cols, generator=torch.Generator().manual_seed(m))
            out[name][m] = round(least_cpu(lambda: bitlinear(x), rounds) / m * 1e6, 1)
    return out


def forward_costs(module: Any, vocab: int, rounds: int) -> dict[str, float]:
    """Milliseconds of CPU per prompt token (BxT prefill) or per row (Bx1 fused decode)."""
    out = {}
    for b, t in PREFILLS + tuple((b, 1) for b in DECODES):
        ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(b * t))
        mask = torch.ones_like(ids, dtype=torch.bool)
        cost = least_cpu(lambda: module(ids, module.new_cache(b), mask, last_only=True), rounds)
        out[f"{b}x{t}" + (" (fused decode)" if t == 1 else "")] = round(cost / (b * t) * 1e3, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preset:mmfree-370m")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = memwise.load(args.model)
    with torch.inference_mode():
        report = {"model": args.model, "threads": 1,
                  "product_us_per_row": product_costs(model.module, args.rounds),
                  "forward_ms_per_token": forward_costs(model.module, model.spec.vocab_size, args.rounds)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
