"""Where the fused decode step's time goes, phase by phase.

Builds a copy of memwise whose hgrn_step_run (memwise/kernels/hgrn_step.h) reads the clock at every
barrier, runs the fused step of a preset, and prints per phase (the code between two barriers,
named by the source line of its closing barrier; the lm_head, by the end of the step): the wall
time per step as thread 0 sees it,
and each thread's time from leaving the previous barrier to arriving at this one.  Phases are
products (the run_jobs calls) or the float work between them.  The repository's own build is
left alone.

    python benchmarks/step_phases.py mmfree-2.7b --batch 1 --steps 60

Needs a C compiler with OpenMP, like the package build.  Timings on a shared VM move by 20-40%
from minute to minute: compare phases within one run, and variants in alternation.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path("src/memwise/kernels/hgrn_step.h")

TIMERS = r"""
#define PROF_SITES 64
#define PROF_THREADS 8
static double prof_wall[PROF_SITES], prof_work[PROF_THREADS][PROF_SITES], prof_left[PROF_THREADS];
static double prof_last;
static long prof_steps;
static int prof_line[PROF_SITES];
static void prof_dump(void) {
    if (!prof_steps) return;
    for (int k = 0; k < PROF_SITES; ++k) {
        if (!prof_line[k]) continue;
        fprintf(stderr, "phase %d line %d: wall %.4f ms", k, prof_line[k], prof_wall[k] / prof_steps * 1e3);
        for (int t = 0; t < PROF_THREADS; ++t)
            if (prof_work[t][k] > 0) fprintf(stderr, " t%d %.4f", t, prof_work[t][k] / prof_steps * 1e3);
        fprintf(stderr, "\n");
    }
}
#define PROF_ARRIVE(k) do { if (id < PROF_THREADS) prof_work[id][k] += omp_get_wtime() - prof_left[id]; } while (0)
#define PROF_LEAVE(k, line) do { const double t_ = omp_get_wtime(); if (id < PROF_THREADS) prof_left[id] = t_; \
    if (id == 0) { prof_wall[k] += t_ - prof_last; prof_last = t_; prof_line[k] = line; } } while (0)
"""


def instrumented(text: str) -> str:
    start = text.index("static void hgrn_step_run(")
    end = text.index("#undef SYNC", start)
    head, body = text[:start], text[start:end]
    # The barriers in the step's body (after the SYNC macro's definitions).
    defs_end = body.index("#define SYNC\n#endif") + len("#define SYNC\n#endif")
    first_line = head.count("\n") + 1
    count = 0

    def timed(match: re.Match) -> str:
        nonlocal count
        line = first_line + body[:defs_end + match.start()].count("\n")
        count += 1
        return f"PROF_ARRIVE({count - 1}); SYNC PROF_LEAVE({count - 1}, {line});"

    rest = re.sub(r"\bSYNC(?=\s*\n)", timed, body[defs_end:])
    if count == 0 or count > 64:
        raise SystemExit(f"step_phases: found {count} barriers in hgrn_step_run; the instrumenting no longer fits the source")
    body = body[:defs_end] + rest
    # The lm_head, after the last barrier: timed to the end of the step.
    last = first_line + body[:body.index("#undef sums")].count("\n")
    body = body.replace("#undef sums", f"PROF_ARRIVE(63); PROF_LEAVE(63, {last});\n#undef sums", 1)
    body = body.replace("    const int64_t *plan = a->plan;",
                        "    static int registered;\n    if (!registered) registered = 1, atexit(prof_dump);\n"
                        "    ++prof_steps;\n    prof_last = omp_get_wtime();\n"
                        "    for (int t = 0; t < PROF_THREADS; ++t) prof_left[t] = prof_last;\n"
                        "    const int64_t *plan = a->plan;", 1)
    return head + TIMERS + body + text[end:]


# A fused decoder of preset argv[1] at batch argv[2], after 5 warm-up steps (step_ab.py's workers
# start the same way).
SETUP = r"""
import sys, time, torch, memwise
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
      f"over {steps} steps (the phase table below also counts the 5 warm-up steps)", flush=True)
"""


def build_copy(dest: Path, source_text: str, part: Path = SOURCE) -> str | None:
    """A copy of memwise under dest with source_text as its part (a file of the kernels' source),
    built in place; the build's output when it fails, else None.  The repository's own build is
    left alone."""
    shutil.copytree(ROOT / "src" / "memwise", dest / "src" / "memwise",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    (dest / part).write_text(source_text)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=dest,
                           capture_output=True, text=True)
    if build.returncode != 0 or not list((dest / SOURCE.parent).glob("_ternary*.so")):
        return build.stdout + build.stderr
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="mmfree-2.7b", help="a MatMul-free preset name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--source", type=Path, default=ROOT / SOURCE,
                        help="a variant of hgrn_step.h to time instead of the repository's (for experiments)")
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be at least 1")
    try:
        text = args.source.read_text()
    except OSError as error:
        parser.error(f"--source {args.source}: {error.strerror}")
    with tempfile.TemporaryDirectory(prefix="memwise-phases-") as tmp:
        copy = Path(tmp)
        failure = build_copy(copy, instrumented(text))
        if failure is not None:
            sys.stderr.write(failure)
            print("step_phases: building the instrumented extension failed", file=sys.stderr)
            return 1
        env = {**os.environ, "PYTHONPATH": str(copy / "src")}
        run = subprocess.run([sys.executable, "-c", STEPS, args.model, str(args.batch), str(args.steps)],
                             env=env, capture_output=True, text=True)
        sys.stdout.write(run.stdout)
        lines = [line for line in run.stderr.splitlines() if line.startswith("phase ")]
        if run.returncode != 0 or not lines:
            sys.stderr.write(run.stderr)
            return 1
        print("phase (closing barrier's line in hgrn_step.h): wall ms per step on thread 0; per thread, "
              "ms from leaving the previous barrier to arriving at this one")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
