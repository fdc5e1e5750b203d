"""Decode speed of one model with a float32, an int8 and an int4 KV cache, in alternating rounds in one
process (so that other processes' load on a shared VM falls on all three alike); prints each round and
the median ratio of each quantized cache's decode tok/s to the float cache's.

    PYTHONPATH=src python benchmarks/kv_cache_decode_ab.py --model preset:gpt2-medium --threads 2 --rounds 3 \
        --prompt 128 --new 64

The weights are loaded once; each round switches the cache scheme that memwise.load(kv_cache=...)
would have set (the module's `kv_cache`), so the three runs differ in the cache only.
"""
from __future__ import annotations

import argparse
import time

import torch

import memwise

SCHEMES = (None, "int8", "int4")


def decode_tok_s(model, ids: torch.Tensor, new: int) -> float:
    first = None
    for _ in model.stream(ids, max_new_tokens=new, ignore_eos=True):
        first = first or time.perf_counter()
    return (new - 1) / (time.perf_counter() - first)


def cache_step_ms(model, scheme, length: int, repeats: int = 20) -> float:
    """Milliseconds of the cache's part of one decode step at `length` slots in use: every layer
    writes one token's keys and values and reads all `length` back (dequantized when quantized)."""
    spec, module = model.spec, model.module
    module.kv_cache = scheme
    cache = module.new_cache(1, length + 1)
    shape = (1, spec.num_kv_heads, length, spec.head_dim)
    for layer in range(spec.num_layers):
        cache.update(layer, torch.randn(shape), torch.randn(shape))
    cache.length = length
    one = torch.randn(1, spec.num_kv_heads, 1, spec.head_dim)
    times = [[] for _ in range(spec.num_layers)]
    with torch.inference_mode():
        for _ in range(repeats):
            for layer in range(spec.num_layers):
                start = time.perf_counter()
                cache.update(layer, one, one)
                times[layer].append(time.perf_counter() - start)
    module.kv_cache = None
    # each layer's median, summed: a step of a few ms on a shared machine is often preempted, and a
    # layer's tenth of a millisecond seldom is
    return 1000 * sum(sorted(t)[len(t) // 2] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:gpt2-medium")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = memwise.load(args.model)
    ids = torch.randint(3, model.spec.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    def run(scheme):
        model.module.kv_cache = scheme
        return decode_tok_s(model, ids, args.new)

    for scheme in SCHEMES:
        run(scheme)     # warm-up
    rows = []
    for r in range(args.rounds):
        speeds = [run(scheme) for scheme in SCHEMES]
        rows.append(speeds)
        print(f"round {r}: float32 cache {speeds[0]:.2f} tok/s, int8 {speeds[1]:.2f}, int4 {speeds[2]:.2f} | "
              f"int8/float {speeds[1] / speeds[0]:.3f}x, int4/float {speeds[2] / speeds[0]:.3f}x", flush=True)
    median = lambda values: sorted(values)[len(values) // 2]    # noqa: E731
    length = args.prompt + args.new // 2
    steps = {scheme: cache_step_ms(model, scheme, length) for scheme in SCHEMES}
    print(f"cache part of one decode step at {length} slots, all layers (per-layer medians of 20, summed): "
          + ", ".join(f"{scheme or 'float32'} {ms:.2f} ms" for scheme, ms in steps.items()))
    for i, scheme in enumerate(SCHEMES[1:], start=1):
        model.module.kv_cache = scheme
        cache = model.module.cache_bytes(1, args.prompt + args.new)
        model.module.kv_cache = None
        print(f"median {scheme}/float decode: {median([row[i] / row[0] for row in rows]):.3f}x; cache "
              f"{cache / 2**20:.2f} MiB vs {model.module.cache_bytes(1, args.prompt + args.new) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
