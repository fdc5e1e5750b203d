"""memwise.heap: once memwise tunes glibc's malloc, blocks of a few MB come from the heap and freed
heap memory stays mapped (real allocations in fresh processes, read back from /proc/self/maps)."""
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/maps"),
                                reason="the tuning is for glibc's malloc; the check reads Linux's /proc")

# Three 20 MB tensors, then freed. glibc's defaults serve each with an mmap of its own (over the
# initial 128 KB threshold); tuned, they come from the heap, which keeps what it grew by once they
# are freed.
PROBE = """
import json, torch
from memwise.heap import keep_freed_memory
applied = keep_freed_memory()
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            return tuple(int(v, 16) for v in line.split()[0].split("-"))
    return 0, 0
start = heap()[1]
blocks = [torch.empty(5 << 20) for _ in range(3)]
lo, hi = heap()
in_heap = [lo <= b.data_ptr() < hi for b in blocks]
del blocks
grown = hi - start
print(json.dumps({"applied": applied, "in_heap": in_heap, "grown_mb": grown / 2**20,
                  "kept_mb": (heap()[1] - start) / 2**20}))
"""


def probe(tuning: str) -> dict:
    env = dict(os.environ, MEMWISE_MALLOC_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_blocks_come_from_the_heap_and_stay_mapped_once_freed():
    tuned = probe("1")
    assert tuned["applied"] is True
    assert tuned["in_heap"] == [True, True, True]
    # The heap grew by about the 60 MB (less whatever free space it already had), and freeing the
    # blocks returned none of it.
    assert tuned["grown_mb"] >= 50
    assert tuned["kept_mb"] == tuned["grown_mb"]


def test_glibc_defaults_on_request():
    untouched = probe("0")
    assert untouched["applied"] is False
    assert untouched["in_heap"] == [False, False, False]
    assert untouched["kept_mb"] < 60
