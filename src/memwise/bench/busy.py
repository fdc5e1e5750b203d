"""Other processes that keep cores busy beside a cell's timed runs (`memwise bench --busy-cores N`).

A user's machine is rarely idle, and an engine whose threads wait for each other at barriers can
lose far more than the share of the machine another process takes. BusyLoad starts N processes,
each a plain Python loop that never sleeps, not pinned: the scheduler places them as it places
any program a user runs beside the engine. They only compute, so they take CPU time and almost
no memory bandwidth.

They are always stopped: by BusyLoad's exit (also when the run raises or is interrupted), and, if
the cell process dies without running it, by themselves within a few hundred milliseconds, since
each loop checks that the process that started it is still its parent. They stay in the cell's
process group, so the runner's kill of a timed-out cell reaches them too.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

# Until its parent is gone: a check every million iterations, a few tens of milliseconds.
_LOOP = ("import os, sys\n"
         "parent = int(sys.argv[1])\n"
         "while os.getppid() == parent:\n"
         "    for _ in range(1_000_000):\n"
         "        pass\n")
# The load runs this long before the timed work starts, as a process already running would, and
# the machine rests as long after it; memwise's thread choice (memwise.kernels.threads) measures
# the machine over 0.1 s windows.
SETTLE_S = 0.5


class BusyLoad:
    """`with BusyLoad(n):` n busy processes for the duration of the block (module docstring)."""

    def __init__(self, processes: int, settle_s: float | None = None) -> None:
        self.processes = processes
        self.settle_s = SETTLE_S if settle_s is None else settle_s
        self.children: list[subprocess.Popen] = []

    def start(self) -> None:
        try:
            for _ in range(self.processes):
                self.children.append(subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _LOOP, str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if self.children:
                time.sleep(self.settle_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stops them, then waits settle_s: the run that follows starts on a machine that has been
        idle for a moment, as the first one did."""
        started = bool(self.children)
        for child in self.children:
            if child.poll() is None:
                child.kill()
        for child in self.children:
            child.wait()
        self.children = []
        if started:
            time.sleep(self.settle_s)

    def running(self) -> list[int]:
        """Process ids of the busy processes still running."""
        return [c.pid for c in self.children if c.poll() is None]

    def __enter__(self) -> "BusyLoad":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
