"""Where the fused decode step's time goes, phase by phase.

Builds a copy of memwise whose step extension is compiled with -DMW_STEP_TIMING (the timing hook of
memwise/models/hgrn_bit/csrc/hgrn_step.h: every barrier adds the time of the phase it closes), runs
the fused step of a preset, and prints per phase (summed over the layers): the wall time per step
as thread 0 sees it, and each thread's working time (from leaving the previous barrier to arriving
at this one).  Phases are products or the float work between them.  The repository's own build is
left alone.

    python benchmarks/step_phases.py mmfree-2.7b --batch 1 --steps 60

Needs a C compiler with OpenMP, like the package build.  Timings on a shared VM move by 20-40%
from minute to minute: compare phases within one run, and variants in alternation (step_ab.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path("src/memwise/models/hgrn_bit/csrc/hgrn_step.h")


# A fused decoder of preset argv[1] at batch argv[2], after 5 warm-up steps (step_ab.py's and
# compare_revisions.py's workers start the same way; revisions before the hgrn_bit package had the
# step in memwise.kernels).
SETUP = r"""
import sys, time, torch, memwise
try:
    from memwise.models.hgrn_bit import fused_step as fused
except ImportError:
    from memwise.kernels import fused
name, batch = sys.argv[1], int(sys.argv[2])
module = memwise.load(f"preset:{name}").module
decoder = fused.FusedDecoder(module)
state = torch.zeros((len(module.layers), batch, module.spec.hidden_size * module.spec.expand_ratio))
ids = torch.ones((batch, 1), dtype=torch.long)
for _ in range(5):
    decoder.step(ids, state)
"""

STEPS = SETUP + r"""
steps = int(sys.argv[3])
times = []
for _ in range(steps):
    t0 = time.perf_counter(); decoder.step(ids, state); times.append(time.perf_counter() - t0)
times.sort()
print(f"{name} batch {batch}: step min {times[0]*1e3:.2f} ms, median {times[len(times)//2]*1e3:.2f} ms "
      f"over {steps} steps", flush=True)
"""

# The timed steps again, then the hook's sums per phase.
PHASES = STEPS.replace("times = []", "from memwise.models.hgrn_bit import _step\n_step.step_timings()\ntimes = []") + r"""
count, phases = _step.step_timings()
print("phase: wall ms per step on thread 0 | each thread's working ms per step")
for phase, wall, work in phases:
    print(f"{phase:32s} {wall / count * 1e3:8.4f} | " + " ".join(f"{w / count * 1e3:.4f}" for w in work))
"""


def build_copy(dest: Path, replacements: dict[Path, str] | None = None, cflags: str = "") -> str | None:
    """A copy of memwise under dest, with some source files (paths relative to the repository)
    replaced by other text, built in place with extra CFLAGS; the build's output when it fails,
    else None.  The repository's own build is left alone."""
    shutil.copytree(ROOT / "src" / "memwise", dest / "src" / "memwise",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for path, text in (replacements or {}).items():
        (dest / path).write_text(text)
    env = {**os.environ, "CFLAGS": (os.environ.get("CFLAGS", "") + " " + cflags).strip()}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=dest,
                           capture_output=True, text=True, env=env)
    if build.returncode != 0 or not list((dest / SOURCE.parent.parent).glob("_step*.so")):
        return build.stdout + build.stderr
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="mmfree-2.7b", help="a MatMul-free preset name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be at least 1")
    with tempfile.TemporaryDirectory(prefix="memwise-phases-") as tmp:
        copy = Path(tmp)
        failure = build_copy(copy, cflags="-DMW_STEP_TIMING")
        if failure is not None:
            sys.stderr.write(failure)
            print("step_phases: building the timed extension failed", file=sys.stderr)
            return 1
        env = {**os.environ, "PYTHONPATH": str(copy / "src")}
        run = subprocess.run([sys.executable, "-c", PHASES, args.model, str(args.batch), str(args.steps)],
                             env=env, capture_output=True, text=True)
        sys.stdout.write(run.stdout)
        if run.returncode != 0:
            sys.stderr.write(run.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
