"""Prefill tokens/s of BitNet on memwise.lite: the multi-row prefill against the fused step token by token.

Both run in this one process, alternately, on the same prompt, so that the minute-to-minute drift of
a shared machine hits both alike:

    PYTHONPATH=src python benchmarks/bitnet_lite_prefill_ab.py DIR --prompt-tokens 128 --rounds 8

DIR is a packed BitNet checkpoint (`memwise convert` output, or the packed file a bench cell cached
under $XDG_CACHE_HOME/memwise/packed). "multi-row" is memwise.lite's prefill (lite/bitnet_forward.py),
"token by token" feeds the prompt through the fused decode step one token at a time, as memwise.lite
did before it. Each round times one prompt of each (the last token's logits included) and prints
both rates and their ratio; the end prints the median ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import memwise.lite


def multi_row(model, ids: np.ndarray) -> float:
    state = model.new_state(1, ids.shape[1] + 1)
    start = time.perf_counter()
    model._prefill(ids, state, last_only=True)
    return time.perf_counter() - start


def token_by_token(model, ids: np.ndarray) -> float:
    state = model.new_state(1, ids.shape[1] + 1)
    start = time.perf_counter()
    for token in ids[0, :-1]:
        model._hidden(int(token), state)
    model.step(ids[:, -1], state)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    model = memwise.lite.load(args.directory, threads=args.threads)
    ids = np.random.default_rng(0).integers(0, model.spec.vocab_size, (1, args.prompt_tokens))
    multi_row(model, ids), token_by_token(model, ids)      # warm-up: workspaces, pages, caches
    ratios = []
    for _ in range(args.rounds):
        new, old = multi_row(model, ids), token_by_token(model, ids)
        ratios.append(old / new)
        print(f"multi-row {ids.shape[1] / new:.1f} tok/s  token by token {ids.shape[1] / old:.1f} tok/s  "
              f"ratio {old / new:.2f}", flush=True)
    print(f"median ratio {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
