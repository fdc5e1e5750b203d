"""Decode and prefill speed of this working tree against another revision, measured side by side.

Builds REV (a commit, tag or branch) into a temporary directory, then runs the same `memwise bench`
cells on both trees in alternating rounds (the order reversed every other round), so that the
machine's drift moves both alike, and prints per cell the median of each tree's per-round medians
and the ratio this tree / REV (above 1: this tree is faster).

    python benchmarks/compare_revisions.py HEAD~1 --model mmfree-370m --model mmfree-2.7b \
        --batch-size 1 --batch-size 16 --rounds 2

With --steps N it times the fused decode step of MatMul-free presets instead: one worker process
per tree loads the preset once, and the workers take turns, round after round, each timing the
median of N steps; this leaves out everything but the step, whose noise is smaller.

    python benchmarks/compare_revisions.py HEAD~1 --model mmfree-2.7b --batch-size 1 --steps 30 --rounds 12

Needs a C compiler with OpenMP, like the package build, and git. Nothing else should run on the
machine meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_ab import WORKER as STEP_WORKER  # noqa: E402  one tree's fused step, timed on request

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("decode_tok_s", "prefill_tok_s")


def build_revision(rev: str, dest: Path) -> None:
    """REV's tracked files under dest, with its C extensions built in place."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=dest,
                           capture_output=True, text=True)
    if build.returncode != 0:
        raise SystemExit(f"compare_revisions: building {rev} failed:\n{build.stdout}{build.stderr}")


def bench(tree: Path, cells: list[str], out: Path) -> list[dict]:
    """The records of one `memwise bench` run of the memwise in tree."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    run = subprocess.run([sys.executable, "-m", "memwise.bench", *cells, "--out", str(out)], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"compare_revisions: memwise bench in {tree} failed:\n{run.stdout}{run.stderr}")
    data = json.loads((out / "results.json").read_text())
    return data["results"]


def compare_steps(trees: dict[str, Path], model: str, batch: int, rounds: int, steps: int) -> str:
    """A line: the median step time of each tree and the median per-round speed ratio."""
    workers = {name: subprocess.Popen([sys.executable, "-c", STEP_WORKER, model, str(batch)],
                                      env={**os.environ, "PYTHONPATH": str(tree / "src")},
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name, tree in trees.items()}
    medians: dict[str, list[float]] = {name: [] for name in trees}
    try:
        for name, worker in workers.items():
            if worker.stdout.readline().strip() != "ready":
                raise SystemExit(f"compare_revisions: the step worker of {name} did not start")
        for r in range(rounds):
            for name in list(trees) if r % 2 == 0 else list(reversed(list(trees))):
                workers[name].stdin.write(f"{steps}\n")
                workers[name].stdin.flush()
                medians[name].append(float(workers[name].stdout.readline()))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    mine, base = medians.values()
    ratios = [b / m for m, b in zip(mine, base)]
    return (f"| {model} | {batch} | {statistics.median(mine):.3f} | {statistics.median(base):.3f} | "
            f"{statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--model", action="append", default=[], help="repeatable (default: mmfree-370m, mmfree-2.7b)")
    parser.add_argument("--batch-size", action="append", type=int, default=[], help="repeatable (default: 1)")
    parser.add_argument("--engine", default="memwise")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, help="time the fused decode step, this many steps per round")
    args = parser.parse_args()
    if args.rounds < 1 or args.runs < 1:
        parser.error("--rounds and --runs must be at least 1")
    cells = ["--engine", args.engine, "--runs", str(args.runs)]
    for model in args.model or ["mmfree-370m", "mmfree-2.7b"]:
        cells += ["--model", model]
    for batch in args.batch_size or [1]:
        cells += ["--batch-size", str(batch)]
    samples: dict[tuple[str, str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="memwise-compare-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        build_revision(args.rev, base)
        trees = {"this tree": ROOT, args.rev: base}
        if args.steps:
            print(f"fused decode step, this tree vs {args.rev}: {args.rounds} alternating rounds of {args.steps} steps")
            print(f"| model | batch | this tree ms | {args.rev} ms | speed ratio (median) | rounds |")
            print("|---|---:|---:|---:|---:|---|")
            for model in args.model or ["mmfree-370m", "mmfree-2.7b"]:
                for batch in args.batch_size or [1]:
                    print(compare_steps(trees, model, batch, args.rounds, args.steps), flush=True)
            return 0
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                for rec in bench(trees[name], cells, Path(tmp) / f"out-{r}-{name.replace(' ', '_')}"):
                    for metric in METRICS:
                        if rec.get("status") == "ok" and rec.get(metric):
                            key = (name, rec["model"], rec["batch_size"], metric)
                            samples.setdefault(key, []).append(rec[metric])
    print(f"this tree vs {args.rev}: {args.rounds} alternating rounds, medians of {args.runs} runs per round")
    print("| model | batch | metric | this tree | " + args.rev + " | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for (name, model, batch, metric), values in sorted(samples.items()):
        if name != "this tree":
            continue
        base_values = samples.get((args.rev, model, batch, metric))
        if not base_values:
            continue
        mine, theirs = statistics.median(values), statistics.median(base_values)
        print(f"| {model} | {batch} | {metric} | {mine:,.1f} | {theirs:,.1f} | {mine / theirs:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
