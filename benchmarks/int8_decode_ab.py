"""Decode speed of gpt2-medium (synthetic weights) as memwise int8, memwise float32 and transformers
float32, in alternating rounds in one process, so that the load of other processes on a shared VM
falls on all three alike; prints each round and the median ratios.

    OMP_WAIT_POLICY=passive PYTHONPATH=src python benchmarks/int8_decode_ab.py --threads 2 --rounds 3 --new 32
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers

import memwise


class _Clock(transformers.generation.streamers.BaseStreamer):
    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def memwise_decode(model, ids: torch.Tensor, new: int) -> float:
    first = None
    for _ in model.stream(ids, max_new_tokens=new, ignore_eos=True):
        first = first or time.perf_counter()
    return (new - 1) / (time.perf_counter() - first)


def transformers_decode(model, ids: torch.Tensor, new: int) -> float:
    clock = _Clock()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, streamer=clock, pad_token_id=0)
    return (new - 1) / (clock.times[-1] - clock.times[1])    # times[0]: the prompt; [1]: the first new token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quantized = memwise.load("preset:gpt2-medium", quantize="int8")
    full = memwise.load("preset:gpt2-medium")
    config = transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(3, 50000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    runs = (lambda: memwise_decode(quantized, ids, args.new), lambda: memwise_decode(full, ids, args.new),
            lambda: transformers_decode(hf, ids, args.new))
    for run in runs:
        run()   # warm-up
    rows = []
    for r in range(args.rounds):
        a, b, c = (run() for run in runs)
        rows.append((a, b, c))
        print(f"round {r}: memwise int8 {a:.2f} tok/s, memwise float32 {b:.2f}, transformers float32 {c:.2f} | "
              f"int8/transformers {a / c:.2f}x, int8/memwise float32 {a / b:.2f}x", flush=True)
    median = lambda values: sorted(values)[len(values) // 2]    # noqa: E731
    print(f"median int8/transformers {median([a / c for a, _, c in rows]):.2f}x, "
          f"int8/memwise float32 {median([a / b for a, b, _ in rows]):.2f}x")


if __name__ == "__main__":
    main()
