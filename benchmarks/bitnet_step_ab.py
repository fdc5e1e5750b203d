"""Milliseconds per decode step of a BitNet preset: the fused C step against the PyTorch modules.

Both run in this one process, in alternating rounds over the same cache length, so that the
minute-to-minute drift of a shared machine hits both alike:

    PYTHONPATH=src python benchmarks/bitnet_step_ab.py bitnet-b1.58-large --rounds 5 --steps 20 [--threads 1]

"unfused" is backend "c-unfused" (the C products one TernaryProjection at a time, torch for the
rest), "fused" is backend "auto" (one C call for all layers). Each round prefills a 128-token prompt,
then times `steps` single-token steps (the lm_head included in both). Prints the median per round.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import memwise


def time_steps(model, backend: str, prompt: torch.Tensor, steps: int) -> float:
    """Mean ms per decode step after a prefill of `prompt`, with `backend`."""
    model.backend = backend
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch / C threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = memwise.load(f"preset:{args.preset}").module
    prompt = torch.randint(0, model.spec.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            times["unfused"].append(time_steps(model, "c-unfused", prompt, args.steps))
            times["fused"].append(time_steps(model, "auto", prompt, args.steps))
    unfused, fused = statistics.median(times["unfused"]), statistics.median(times["fused"])
    print(f"{args.preset}, {torch.get_num_threads()} threads, prompt {args.prompt}, {args.steps} steps x "
          f"{args.rounds} rounds")
    for name, values in times.items():
        print(f"  {name:8s} median {statistics.median(values):7.2f} ms/step  rounds {[round(v, 2) for v in values]}")
    print(f"  fused speed-up {unfused / fused:.2f}x")


if __name__ == "__main__":
    main()
