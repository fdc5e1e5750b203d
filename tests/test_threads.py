"""memwise.kernels.threads: the CPU budget reads /proc/stat and offers threads for the free cores."""
from __future__ import annotations

from memwise.kernels import threads

STAT = """cpu  {total} 0 0 0 0 0 0 0 0 0
cpu0 {a} 0 0 1000 7 0 0 0 0 0
cpu1 {b} 0 0 {idle} 0 0 0 0 0 0
cpu2 999 0 0 0 0 0 0 0 0 0
intr 1 2 3
"""


def stat(a: int, b: int, idle: int = 0) -> str:
    return STAT.format(total=a + b, a=a, b=b, idle=idle)


def test_busy_seconds_counts_every_field_but_idle_and_iowait_of_allowed_cpus():
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    assert threads.busy_seconds({3}, "cpu3 10 5 10 1000 7 1 1 2 4 0\n", 100.0) == 0.29
    assert threads.busy_seconds({0, 1}, stat(10, 20, idle=50), 100.0) == 0.3
    assert threads.busy_seconds({1}, stat(10, 20), 10.0) == 2.0
    assert threads.busy_seconds({5}, stat(10, 20), 100.0) is None
    assert threads.busy_seconds({0}, "intr 1\n", 100.0) is None


def test_threads_for_the_cores_others_leave():
    assert threads.threads_for(2, 2, 0.0) == 2
    assert threads.threads_for(2, 2, 0.3) == 2
    assert threads.threads_for(2, 2, 0.95) == 1
    assert threads.threads_for(2, 2, 3.0) == 1
    assert threads.threads_for(8, 16, 4.0) == 8
    assert threads.threads_for(16, 16, 4.2) == 12
    assert threads.threads_for(4, 2, -1.0) == 2


def test_budget_follows_other_processes(tmp_path, monkeypatch):
    path = tmp_path / "stat"
    clock = {"wall": 100.0, "cpu": 5.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threads.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(threads, "_allowed_cpus", lambda: {0, 1})
    path.write_text(stat(0, 0))
    budget = threads.CpuBudget(str(path))
    budget._ticks = 100.0
    assert budget.threads(2) == 2            # no window yet
    clock.update(wall=100.25, cpu=5.25)
    path.write_text(stat(22, 25))            # 0.25 s: the machine ran 0.47 CPU-s, this process 0.25
    assert budget.threads(2) == 1 and budget.threads(1) == 1
    path.write_text(stat(44, 25))
    clock.update(wall=101.0, cpu=6.0)        # a pause of 0.75 s with nothing else running: every thread
    assert budget.threads(2) == 2
    clock.update(wall=101.25, cpu=6.25)
    path.write_text(stat(66, 50))
    assert budget.threads(2) == 1 and budget.threads(1) == 1
    clock.update(wall=101.3)
    path.write_text(stat(0, 0))              # inside the window: the last reading stands
    assert budget.threads(2) == 1
    clock.update(wall=101.5, cpu=6.65)
    path.write_text(stat(108, 50))           # others: 0.42 - 0.4 = 0.02 s over 0.25 s
    assert budget.threads(2) == 2
    path.unlink()
    clock.update(wall=101.7)
    assert budget.threads(2) == 2 and not budget.usable   # without /proc/stat: every thread asked for
