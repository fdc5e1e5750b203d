"""Start one cell and watch its memory from outside: `python launcher.py RESULT_JSON CMD...`.

Run by file path, never imported as part of memwise: it must stay a small process. A child's
ru_maxrss (what wait4 and /usr/bin/time report) starts from the high-water mark of the process
that forked it, because the kernel folds the forked address space's mark in at exec. Forked from
the bench's parent, which holds torch and transformers, every cell would appear to peak at least
at the parent's size. Forked from this small launcher, a cell's ru_maxrss is its own.

The launcher samples the cell's VmRSS every 50 ms (ru_maxrss only covers the time since the cell's
last reset of its high-water mark; the samples also see the load), writes
{"wait4_max_rss_bytes", "polled_max_rss_bytes", "returncode"} to RESULT_JSON, and exits with the
cell's status. The cell inherits stdin, stdout and stderr.
"""
import json
import os
import subprocess
import sys
import time

POLL_S = 0.05


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main():
    result_path, command = sys.argv[1], sys.argv[2:]
    env = dict(os.environ, MEMWISE_BENCH_SPAWN_TIME=repr(time.time()))
    proc = subprocess.Popen(command, env=env)
    polled = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        polled = max(polled, rss_bytes(proc.pid))
        time.sleep(POLL_S)
    returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, KiB on Linux
    with open(result_path, "w") as f:
        json.dump({"wait4_max_rss_bytes": usage.ru_maxrss * scale, "polled_max_rss_bytes": polled,
                   "returncode": returncode}, f)
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main())
