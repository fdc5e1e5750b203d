"""Prefill and decode speed of a generation with and without the heap release after the prefill
(memwise.generate hands glibc's free heap pages back to the kernel between the prefill and the
decode), in alternating rounds in one process, so that other processes' load falls on both alike.
Without the release, the next prefill finds its activations' pages still mapped; with it, it faults
them in again. The tokens of both are checked equal before timing.

    PYTHONPATH=src python benchmarks/prefill_trim_ab.py --model preset:gpt2-medium --quantize int4 --rounds 6
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import memwise
import memwise.generate as generate


def timed(model, ids: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(prefill tok/s, decode tok/s, the new tokens) of one generation."""
    start = time.perf_counter()
    steps = model.stream(ids, max_new_tokens=new, ignore_eos=True)
    tokens = [next(steps)]
    first = time.perf_counter()
    tokens.extend(steps)
    end = time.perf_counter()
    return ids.shape[1] / (first - start), (new - 1) / (end - first), torch.stack(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:gpt2-medium")
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    model = memwise.load(args.model, quantize=args.quantize)
    ids = torch.randint(0, model.spec.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    release = generate.release_free_heap
    variants = {"release": release, "keep": lambda: None}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    reference = None
    for round_ in range(args.rounds + 1):           # round 0 warms up and checks the tokens
        for name, function in variants.items():
            generate.release_free_heap = function
            prefill, decode, tokens = timed(model, ids, args.new)
            if round_ == 0:
                reference = tokens if reference is None else reference
                if not torch.equal(tokens, reference):
                    raise SystemExit(f"{name}: tokens differ from the first variant's")
            else:
                results[name].append((prefill, decode))
    generate.release_free_heap = release
    for name, runs in results.items():
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        print(f"{name:8s} prefill tok/s median {prefill:8.1f} (best {max(r[0] for r in runs):8.1f}); "
              f"decode tok/s median {decode:6.1f} (best {max(r[1] for r in runs):6.1f})")
    for index, what in enumerate(("prefill", "decode")):
        ratios = [a[index] / b[index] for a, b in zip(results["release"], results["keep"])]
        print(f"{what}: release / keep per round {[round(r, 3) for r in ratios]}, median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
