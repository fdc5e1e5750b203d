"""`memwise serve` in a fresh process for `memwise bench serve`: a free 127.0.0.1 port, the wait for
/health, resident memory sampled from outside while the load runs, and a graceful stop (SIGINT)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from memwise.errors import MemwiseError

# How often the server's resident memory is read while it runs.
_RSS_EVERY_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler:
    """Peak resident memory of a process and its children, read every _RSS_EVERY_S in a thread."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def read(self) -> int:
        try:
            procs = [self.process, *self.process.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs if p.is_running())
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self._stop.wait(_RSS_EVERY_S)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class LaunchedServer:
    """`memwise serve MODEL` (or `command`, a peer's server on `port`) on a free port, in its own
    session; a context manager that stops it."""

    def __init__(self, model: str, served_name: str, extra: list[str], startup_timeout_s: float = 600.0,
                 port: int | None = None, command: list[str] | None = None, health_path: str = "/health",
                 label: str = "memwise serve"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.served_name = served_name
        self.command = command or [sys.executable, "-c", "import sys; from memwise.cli import main; sys.exit(main())",
                                   "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
                                   "--served-name", served_name, "--log-level", "warning", *extra]
        self.health_path = health_path
        self.label = label
        self.startup_timeout_s = startup_timeout_s
        self.exit_code: int | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="memwise-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LaunchedServer":
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])     # this very memwise, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["TOKENIZERS_PARALLELISM"] = "false"
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.exit_code = self.proc.returncode
                raise MemwiseError(f"{self.label} exited {self.proc.returncode} before it answered: {self.last_line()}")
            try:
                if httpx.get(self.url + self.health_path, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise MemwiseError(f"{self.label} did not answer {self.health_path} within {self.startup_timeout_s:g} s")

    def last_line(self) -> str:
        self._log.flush()
        lines = [line for line in Path(self._log.name).read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def log_text(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGINT, as a person at the terminal would; SIGKILL if it has not exited within timeout_s."""
        if self.proc is None or self.proc.poll() is not None:
            self.exit_code = None if self.proc is None else self.proc.returncode
            return self.exit_code
        self.proc.send_signal(signal.SIGINT)
        try:
            self.exit_code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.exit_code = self.proc.wait()
        return self.exit_code

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)
