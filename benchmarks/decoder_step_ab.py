"""Milliseconds per decode step of a quantized decoder preset: the fused C step against the PyTorch
modules (each product a C call, torch for the rest).

Both run in this one process, in alternating rounds over the same cache length, so that the
minute-to-minute drift of a shared machine hits both alike:

    PYTHONPATH=src python benchmarks/decoder_step_ab.py gpt2-medium --quantize int4 --rounds 5 --steps 20 [--threads 2]

"unfused" is MEMWISE_FUSED_STEP=0, "fused" the default (one C call for all layers). Each round
prefills a 128-token prompt, then times `steps` single-token steps (embedding, final norm and the
lm_head included in both). Prints the median per round.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import memwise


def time_steps(model, fused: bool, prompt: torch.Tensor, steps: int) -> float:
    """Mean ms per decode step after a prefill of `prompt`, with the fused step on or off."""
    os.environ["MEMWISE_FUSED_STEP"] = "1" if fused else "0"
    cache = model.new_cache(1, prompt.shape[1] + steps + 4)
    token = torch.tensor([[5]])
    model(prompt, cache, last_only=True)
    for _ in range(2):
        model(token, cache, last_only=True)
    start = time.perf_counter()
    for _ in range(steps):
        model(token, cache, last_only=True)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--quantize", default="int4", choices=("int8", "int4"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch / C threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = memwise.load(f"preset:{args.preset}", quantize=args.quantize).module
    prompt = torch.randint(0, model.spec.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            times["unfused"].append(time_steps(model, False, prompt, args.steps))
            times["fused"].append(time_steps(model, True, prompt, args.steps))
    if not model._fused_decoder:
        raise SystemExit(f"{args.preset} with {args.quantize} has no fused step: nothing to compare")
    unfused, fused = statistics.median(times["unfused"]), statistics.median(times["fused"])
    print(f"{args.preset} {args.quantize}, {torch.get_num_threads()} threads, prompt {args.prompt}, "
          f"{args.steps} steps x {args.rounds} rounds")
    for name, values in times.items():
        print(f"  {name:8s} median {statistics.median(values):7.2f} ms/step  rounds {[round(v, 2) for v in values]}")
    print(f"  fused speed-up {unfused / fused:.2f}x")


if __name__ == "__main__":
    main()
