"""The planner's compute side against a measurement: a model that fits in memory (the plan keeps every
layer resident, nothing is read from disk), its predicted prefill time and decode step against
memwise's measured ones, per (scheme, batch). The disk side needs the streaming runtime (issue 21
part 1), which reports its own measured-against-predicted figures.

Each cell runs in this process after a warm-up generation; synthetic prompts of exact length, EOS
ignored; prefill = a 1-token generation, decode step = (N-token time - 1-token time) / (N - 1).
The cost figures are this machine's cached ones (memwise.offload.costs).

    PYTHONPATH=src python benchmarks/plan_vs_resident.py --model preset:opt-350m --schemes float32 int8 \
        --batch 1 16 --prompt-tokens 32 --new-tokens 16
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def measure(model, batch: int, prompt: int, new: int) -> tuple[float, float]:
    import torch

    ids = torch.randint(4, 1000, (batch, prompt), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, ignore_eos=True)
        return time.perf_counter() - start

    run(2)
    one = min(run(1) for _ in range(2))
    full = min(run(new) for _ in range(2))
    return one, (full - one) / (new - 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preset:opt-350m")
    parser.add_argument("--schemes", nargs="+", default=["float32", "int8"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    import memwise
    from memwise.offload.probes import machine_costs
    from memwise.offload.plan import plan

    costs = machine_costs(log=lambda line: print(line, file=sys.stderr))
    rows = []
    for scheme in args.schemes:
        quantize = None if scheme == "float32" else scheme
        model = memwise.load(args.model, quantize=quantize)
        for batch in args.batch:
            policy = plan(args.model, 64 << 30, costs, scheme=quantize, batch_sizes=(batch,),
                          prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens).policy
            assert policy.streamed_layers == 0 and policy.micro_batches == 1, policy
            prefill, step = measure(model, batch, args.prompt_tokens, args.new_tokens)
            row = {"scheme": scheme, "batch": batch, "predicted_prefill_s": policy.predicted_prefill_s,
                   "measured_prefill_s": prefill, "predicted_step_s": policy.predicted_step_s, "measured_step_s": step}
            rows.append(row)
            print(f"{args.model} {scheme} batch {batch}: prefill {prefill:.3f} s measured / "
                  f"{policy.predicted_prefill_s:.3f} s predicted; decode step {step * 1e3:.1f} ms measured / "
                  f"{policy.predicted_step_s * 1e3:.1f} ms predicted (ratio {step / policy.predicted_step_s:.2f})",
                  flush=True)
        del model
    print(json.dumps({"model": args.model, "costs_measured_at": costs.measured_at, "cells": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
