"""`memwise bench --busy-cores N`: busy processes start, are always stopped, and the record and report
carry the runs beside them. No timing is asserted: only which processes exist and which fields are set."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from memwise.bench import busy, cli
from memwise.bench.cell import RECORD_FIELDS, CellSpec, run_cell
from memwise.bench.engines import GenerationTiming
from memwise.bench.sources import resolve

SRC = Path(__file__).resolve().parents[1] / "src"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], limit_s: float = 30.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(autouse=True)
def no_settling(monkeypatch):
    monkeypatch.setattr(busy, "SETTLE_S", 0.0)


def test_busy_processes_run_inside_the_block_and_stop_after():
    with busy.BusyLoad(2, settle_s=0) as load:
        pids = load.running()
        assert len(pids) == 2 and not any(gone(p) for p in pids)
        assert {p.pid for p in psutil.Process().children()} >= set(pids)
    assert all(gone(p) for p in pids) and load.running() == []
    with busy.BusyLoad(0, settle_s=0) as load:
        assert load.running() == []


def test_busy_processes_stop_when_the_block_raises_or_is_interrupted():
    for error in (RuntimeError("cell failed"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with busy.BusyLoad(1, settle_s=0) as load:
                pids = load.running()
                raise error
        assert pids and all(gone(p) for p in pids)


def test_busy_processes_stop_by_themselves_when_the_cell_dies(tmp_path):
    # A cell killed with SIGKILL runs no cleanup; its busy processes notice their parent is gone.
    script = ("import sys, time\nfrom memwise.bench.busy import BusyLoad\n"
              "load = BusyLoad(2, settle_s=0)\nload.start()\nprint(*load.running(), flush=True)\ntime.sleep(600)\n")
    cell = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(SRC)))
    try:
        pids = [int(p) for p in cell.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        cell.send_signal(signal.SIGKILL)
        cell.wait()
    assert wait_gone(pids)


class FakeEngine:
    """Generates nothing; raises `error` on the call numbered fail_at, and notes the busy processes
    it saw beside each call."""

    def __init__(self, fail_at: int | None = None, error: BaseException | None = None):
        self.fail_at, self.error, self.calls, self.seen = fail_at, error, 0, []

    def load(self, source, dtype, device): pass
    def weights_bytes(self): return 0
    def decode_bytes_per_token(self): return 0
    def vocab_size(self): return 10

    def generate(self, ids, options):
        self.seen.append([c.pid for c in psutil.Process().children()])
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return GenerationTiming(0.1 + 0.1 * (len(self.seen[-1]) > 0), 1.0, options.max_new_tokens)


def _spec(busy_cores: int, runs: int = 2, warmup: int = 1) -> CellSpec:
    source = resolve("preset:tiny-mmfree")
    return CellSpec(model="m", engine="fake", prompt_tokens=4, new_tokens=3, runs=runs, warmup=warmup,
                    busy_cores=busy_cores, source=dict(name="m", source=source.source, kind="preset",
                                                       weights="synthetic", config=source.config))


def _with_engine(monkeypatch, engine: FakeEngine) -> FakeEngine:
    import memwise.bench.engines as engines

    monkeypatch.setattr(engines, "engine_named", lambda name: engine)
    return engine


def test_a_cell_times_each_run_with_and_without_busy_processes(monkeypatch):
    engine = _with_engine(monkeypatch, FakeEngine())
    record = run_cell(_spec(busy_cores=1, runs=3))
    assert record["status"] == "ok", record["reason"]
    # warm-up and timed runs each twice, alternating which goes first
    assert [len(s) for s in engine.seen] == [0, 1, 1, 0, 0, 1, 1, 0]
    assert record["busy_cores"] == 1 and len(record["busy_decode_tok_s_samples"]) == 3
    assert record["busy_prefill_ratio"] == pytest.approx(0.5) and record["busy_decode_ratio"] is not None
    assert set(RECORD_FIELDS) <= set(record)
    assert psutil.Process().children() == []
    plain = run_cell(_spec(busy_cores=0))
    assert plain["busy_cores"] is None and plain["busy_decode_ratio"] is None
    assert all(seen == [] for seen in engine.seen[8:])


def test_a_failing_or_interrupted_cell_leaves_no_busy_process(monkeypatch):
    engine = _with_engine(monkeypatch, FakeEngine(fail_at=2, error=RuntimeError("boom")))
    record = run_cell(_spec(busy_cores=2))
    assert record["status"] == "error" and "boom" in record["reason"]
    assert len(engine.seen[1]) == 2 and psutil.Process().children() == []
    _with_engine(monkeypatch, FakeEngine(fail_at=2, error=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_cell(_spec(busy_cores=1))
    assert psutil.Process().children() == []


def test_flag_checks_and_report_columns(tmp_path, capsys):
    from memwise.bench.report import markdown

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--busy-cores", "-1"])
    assert exit_info.value.code == 2 and "--busy-cores" in capsys.readouterr().err
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(model="m", engine="memwise", status="ok", decode_tok_s=100.0, busy_cores=1,
                  busy_decode_tok_s=45.0, busy_decode_ratio=0.45, busy_prefill_ratio=0.5)
    text = markdown([record], {"busy_cores": 1})
    assert "Decode busy/idle" in text and "0.45" in text and "busy-loop processes" in text
    assert "Busy cores" not in markdown([dict(record, busy_cores=None)], {})
    json.dumps(record)
