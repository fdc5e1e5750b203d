"""Where an offloaded (or in-memory) batched generation spends its time, against the plan: each
forward pass's wall time, and over the whole generation the seconds inside the linears, torch's
attention (scaled_dot_product_attention), the KV cache writes and the decoder blocks, so that what
the cost model leaves out (the blocks minus their linears and attention) shows.

    PYTHONPATH=src python benchmarks/offload_step_split.py --source DIR_OR_PRESET --quantize int8 \
        --max-memory 2GiB --batch 32 --prompt-tokens 8 --new-tokens 32

One warm-up generation of one token (which applies the plan), then the timed one. The wrappers add
a few microseconds per call; timings on a shared machine move with its load.
"""
from __future__ import annotations

import argparse
import collections
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import memwise
from memwise.models.decoder import cache as decoder_cache
from memwise.models.decoder import modules
from memwise.models.decoder.dense import DenseLinear
from memwise.models.decoder.quantized import LINEARS


def timed(seconds: dict[str, float], key: str | Callable[[], str], function: Callable) -> Callable:
    """`function`, adding its wall time to seconds[key] (key() when a callable)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[key() if callable(key) else key] += time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="preset:opt-350m")
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--offload-dir", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model = memwise.load(args.source, quantize=args.quantize, max_memory=args.max_memory, offload_dir=args.offload_dir)
    ids = torch.randint(4, min(50000, model.spec.vocab_size), (args.batch, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(0))
    model.generate(ids, 1, ignore_eos=True)
    seconds: dict[str, float] = collections.defaultdict(float)
    passes: list[float] = []
    depth = [0]         # inside a decoder block, or not (the lm_head)
    where = lambda: "linears in the blocks" if depth[0] else "other linears (lm_head)"  # noqa: E731
    for cls in (*LINEARS.values(), DenseLinear):
        cls.forward = timed(seconds, where, cls.forward)
    F.scaled_dot_product_attention = timed(seconds, "attention", F.scaled_dot_product_attention)
    decoder_cache.DecoderCache.update = timed(seconds, "KV cache writes", decoder_cache.DecoderCache.update)
    block = modules.Block.forward

    def counted_block(*a: Any, **k: Any) -> Any:
        depth[0] += 1
        try:
            return block(*a, **k)
        finally:
            depth[0] -= 1
    modules.Block.forward = timed(seconds, "decoder blocks", counted_block)
    forward = type(model.module).forward

    def counted_forward(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        out = forward(*a, **k)
        passes.append(time.perf_counter() - start)
        return out
    type(model.module).forward = counted_forward
    start = time.perf_counter()
    model.generate(ids, args.new_tokens, ignore_eos=True)
    total = time.perf_counter() - start
    runtime = getattr(model.module, "offload_runtime", None)
    policy = runtime.last.policy if runtime is not None and runtime.last is not None else None
    print(f"{args.source} {args.quantize or 'float32'} batch {args.batch}, {args.prompt_tokens} + {args.new_tokens} "
          f"tokens: {total:.3f} s, {args.batch * args.new_tokens / total:.2f} tok/s")
    if policy is not None:
        print(f"plan: prefill {policy.predicted_prefill_s:.3f} s, decode step {policy.predicted_step_s:.3f} s, "
              f"{policy.predicted_tokens_per_s:.2f} tok/s ({policy.resident_layers} of {policy.layers} resident)")
    steps = passes[1:]
    print(f"measured: prefill {passes[0]:.3f} s, decode steps {min(steps):.3f}-{max(steps):.3f} s "
          f"(mean {sum(steps) / len(steps):.3f})" if steps else f"measured: prefill {passes[0]:.3f} s")
    keys = ("decoder blocks", "linears in the blocks", "attention", "KV cache writes", "other linears (lm_head)")
    for key in keys:
        print(f"  {key:24s} {seconds[key]:.3f} s")
    rest = seconds["decoder blocks"] - sum(seconds[key] for key in keys[1:4])
    print(f"  {'rest of the blocks':24s} {rest:.3f} s (norms, residual adds, activation, reshapes)")

if __name__ == "__main__":
    main()
