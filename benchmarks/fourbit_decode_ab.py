"""Decode speed of gpt2-medium (synthetic weights) as memwise int4, nf4 and int8 and transformers float32,
in alternating rounds in one process, so that the load of other processes on a shared VM falls on all
alike; prints each round and the median ratios to transformers float32.

    OMP_WAIT_POLICY=passive PYTHONPATH=src python benchmarks/fourbit_decode_ab.py --threads 2 --rounds 3 --new 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

import memwise

sys.path.insert(0, str(Path(__file__).parent))
from int8_decode_ab import memwise_decode, transformers_decode  # noqa: E402

SCHEMES = ("int4", "nf4", "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {scheme: memwise.load("preset:gpt2-medium", quantize=scheme) for scheme in SCHEMES}
    config = transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(3, 50000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    runs = {s: (lambda m=m: memwise_decode(m, ids, args.new)) for s, m in models.items()}
    runs["transformers float32"] = lambda: transformers_decode(hf, ids, args.new)
    for run in runs.values():
        run()   # warm-up
    rows = []
    for r in range(args.rounds):
        speeds = {name: run() for name, run in runs.items()}
        rows.append(speeds)
        base = speeds["transformers float32"]
        print(f"round {r}: " + ", ".join(f"{name} {v:.2f} tok/s" for name, v in speeds.items()) + " | "
              + ", ".join(f"{s}/transformers {speeds[s] / base:.2f}x" for s in SCHEMES), flush=True)
    median = lambda values: sorted(values)[len(values) // 2]    # noqa: E731
    print("median " + ", ".join(f"{s}/transformers {median([r[s] / r['transformers float32'] for r in rows]):.2f}x"
                                for s in SCHEMES))


if __name__ == "__main__":
    main()
