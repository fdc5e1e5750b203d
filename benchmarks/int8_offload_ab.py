"""A/B of built int8 product extensions inside offload_throughput.py's memwise int8 cell: the same
model (the synthetic opt-1.3b checkpoint, --max-memory 2GiB, offloaded or resident as the plan
says), the same prompts and generation (batch x 8 prompt tokens, 4 new, after a 1-token warm-up),
loaded once, with memwise.kernels.int8's extension swapped between the given .so files before each
timed generation, the order reversed every other round. On a shared machine this puts the load on
both variants alike, which fresh processes one after another do not.

Prints tokens/s (batch x new / seconds, prefill included, as the cell) per round and variant, the
seconds inside the int8 products, and the medians; the generated tokens are checked equal.
--source, --prompt-tokens, --new-tokens and --max-memory none measure another int8 model the same
way (e.g. a prefill: --source preset:gpt2-medium --batch 1 --prompt-tokens 128 --new-tokens 1).

    cp src/memwise/kernels/_int8*.so /tmp/int8_main.so      # before rebuilding
    PYTHONPATH=src python benchmarks/int8_offload_ab.py /tmp/int8_main.so src/memwise/kernels/_int8*.so
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import accelerate_offload  # noqa: E402
from int8_gemm_ab import load  # noqa: E402

import memwise  # noqa: E402
from memwise.kernels import int8  # noqa: E402


class ProductClock:
    """Seconds spent in int8_linear's C call, through whichever extension is in place."""

    def __init__(self) -> None:
        self.seconds, self.module = 0.0, None

    def linear(self, *args) -> None:
        start = time.perf_counter()
        self.module.linear(*args)
        self.seconds += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extensions", nargs="+")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-memory", default="2GiB", help="'none': no budget, all weights resident")
    parser.add_argument("--source", default=None, help="default: the synthetic opt-1.3b checkpoint")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--offload-dir", default="/tmp/memwise-int8-offload-ab")
    args = parser.parse_args()
    modules = [load(path, i) for i, path in enumerate(args.extensions)]
    source = args.source or str(accelerate_offload.checkpoint("opt-1.3b"))
    budget = None if args.max_memory == "none" else args.max_memory
    model = memwise.load(source, max_memory=budget, offload_dir=args.offload_dir if budget else None,
                         quantize="int8")
    ids = torch.randint(4, min(50000, model.spec.vocab_size), (args.batch, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(0))
    clock = ProductClock()
    int8._c = clock
    rates: list[list[float]] = [[] for _ in modules]
    firsts: list = [None] * len(modules)
    for r in range(args.rounds + 1):
        for i in (range(len(modules)) if r % 2 == 0 else reversed(range(len(modules)))):
            clock.module, clock.seconds = modules[i], 0.0
            if r == 0:
                model.generate(ids, 1, ignore_eos=True)        # warm-up, as the cell
                continue
            start = time.perf_counter()
            out = model.generate(ids, args.new_tokens, ignore_eos=True)
            seconds = time.perf_counter() - start
            firsts[i] = out if firsts[i] is None else firsts[i]
            rates[i].append(args.batch * args.new_tokens / seconds)
            print(f"round {r} {modules[i].label}: {rates[i][-1]:.2f} tok/s, {seconds:.2f} s, "
                  f"int8 products {clock.seconds:.2f} s", flush=True)
    assert all(torch.equal(f, firsts[0]) for f in firsts), "the variants generated different tokens"
    base = statistics.median(rates[0])
    for module, rate in zip(modules, rates):
        print(f"{module.label}: median {statistics.median(rate):.2f} tok/s x{statistics.median(rate) / base:.2f}")


if __name__ == "__main__":
    main()
