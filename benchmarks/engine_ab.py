"""Decode and prefill speed of two memwise source trees, in alternating fresh processes.

    python benchmarks/engine_ab.py OTHER_TREE [--model preset:mmfree-370m] [--rounds 5]

OTHER_TREE is another checkout of memwise (for instance `git worktree add ../before COMMIT`, then
`python setup.py build_ext --inplace` there); this tree is the second of each pair. Each round runs
one process per tree, in alternating order, each loading the model, warming up once and timing one
generation of --prompt-tokens + --new-tokens greedy tokens at batch 1. The ratio of the two trees is
taken within each round (a VM's speed drifts between rounds more than a small change moves it), and
the median of those ratios is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time, torch, memwise
model = memwise.load(sys.argv[1])
prompt = torch.randint(0, model.spec.vocab_size, (1, int(sys.argv[2])), generator=torch.Generator().manual_seed(0))
new = int(sys.argv[3])
for run in range(2):
    start = time.perf_counter()
    steps = model.stream(prompt, max_new_tokens=new, ignore_eos=True, min_new_tokens=new)
    next(steps)
    first = time.perf_counter()
    for _ in steps:
        pass
    end = time.perf_counter()
print(json.dumps({"file": memwise.__file__, "prefill_tok_s": prompt.shape[1] / (first - start),
                  "decode_tok_s": (new - 1) / (end - first)}))
"""


def measure(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.prompt_tokens), str(args.new_tokens)],
                         env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["file"].startswith(str(tree)):
        raise SystemExit(f"{tree}: the child imported memwise from {result['file']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path)
    parser.add_argument("--model", default="preset:mmfree-370m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    trees = {"other": args.other.resolve(), "this": HERE}
    ratios: dict[str, list[float]] = {"decode_tok_s": [], "prefill_tok_s": []}
    for round_ in range(args.rounds):
        order = ["other", "this"] if round_ % 2 == 0 else ["this", "other"]
        results = {name: measure(trees[name], args) for name in order}
        for key in ratios:
            ratios[key].append(results["this"][key] / results["other"][key])
        print(f"round {round_ + 1}: " + "  ".join(
            f"{name} decode {results[name]['decode_tok_s']:.1f} prefill {results[name]['prefill_tok_s']:.1f}"
            for name in ("other", "this")), flush=True)
    for key, values in ratios.items():
        print(f"{key} this/other: median {statistics.median(values):.3f}  (rounds: "
              + ", ".join(f"{v:.3f}" for v in values) + ")")


if __name__ == "__main__":
    main()
