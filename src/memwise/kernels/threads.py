"""How many threads a parallel kernel should use now that other processes share the machine.

A step split evenly over n threads waits, at each of its barriers, for the slowest thread. When
another process takes a core, the thread that shares that core runs only part of the time, and a
decode step (hundreds of barriers) then goes at the pace of its descheduled moments, far below the
share of the machine that is left to it. With one thread per free core, none of them has to share.

CpuBudget measures, over windows of WINDOW_S, the CPU time that other processes used: the
machine's busy time (/proc/stat, the CPUs this process may run on) less this process's own. It
offers threads for the cores that remain, rounded, at least one. After a pause the window is the
pause itself, the best guess of what the machine does now. (Offering every thread after a pause
instead cost a busy machine's decode most of its speed: a few steps on a shared core are slower
than all the others together.) Where /proc/stat is missing (not
Linux) it offers every thread asked for, and so it does with MEMWISE_FIXED_THREADS=1.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

WINDOW_S = 0.1   # /proc/stat counts in 10 ms ticks: 10 per CPU and window, enough to tell a busy core
_IDLE_FIELDS = (3, 4)  # idle and iowait; every other field of a cpu line is time something ran


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def busy_seconds(cpus: set[int], text: str, ticks_per_s: float) -> float | None:
    """CPU seconds that the given CPUs spent running anything, from /proc/stat's text."""
    total, seen = 0, 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]
        total += sum(v for k, v in enumerate(values) if k not in _IDLE_FIELDS)
        seen += 1
    return total / ticks_per_s if seen else None


def threads_for(wanted: int, cpus: int, others_cores: float) -> int:
    """Threads for the cores other processes leave free (others_cores of cpus busy), 1..wanted."""
    free = cpus - max(others_cores, 0.0)
    return max(1, min(wanted, int(free + 0.5)))


class CpuBudget:
    """threads(wanted): wanted, or fewer while other processes keep cores busy (module docstring)."""

    def __init__(self, stat_path: str = "/proc/stat") -> None:
        self._path = stat_path
        self._cpus = _allowed_cpus()
        try:
            self._ticks = float(os.sysconf("SC_CLK_TCK"))
        except (AttributeError, ValueError, OSError):
            self._ticks = 100.0
        self._mark: tuple[float, float, float] | None = None  # wall, own CPU, machine busy seconds
        self._others = 0.0
        self.usable = os.path.exists(stat_path)

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open(self._path) as f:
                busy = busy_seconds(self._cpus, f.read(), self._ticks)
        except OSError:
            busy = None
        if busy is None:
            self.usable = False
            return None
        return time.monotonic(), time.process_time(), busy

    def others_cores(self) -> float:
        """Cores other processes kept busy over the last full window (0 before the first one)."""
        now = time.monotonic()
        if self.usable and (self._mark is None or now - self._mark[0] >= WINDOW_S):
            sample = self._sample()
            if sample is not None and self._mark is not None:
                wall = sample[0] - self._mark[0]
                own = sample[1] - self._mark[1]
                self._others = max(0.0, (sample[2] - self._mark[2] - own) / wall)
            self._mark = sample
        return self._others

    def threads(self, wanted: int) -> int:
        if wanted <= 1 or not self.usable or os.environ.get("MEMWISE_FIXED_THREADS") == "1":
            return max(1, wanted)
        return threads_for(wanted, len(self._cpus), self.others_cores())

    @contextlib.contextmanager
    def torch_threads(self) -> Iterator[int]:
        """torch's thread count lowered to threads(its count) for the block, and restored after:
        torch's own parallel regions wait for their slowest thread like the kernels' do. Yields
        the count in force."""
        import torch

        previous = torch.get_num_threads()
        threads = self.threads(previous)
        if threads >= previous:
            yield previous
            return
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(previous)
