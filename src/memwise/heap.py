"""glibc heap settings for CPU inference.

torch allocates CPU tensors with malloc. By default glibc serves blocks above a threshold (128 KB,
raised at run time towards the size of blocks freed, up to 32 MB) with fresh mmaps, and hands the
top of the heap back to the kernel once more than twice that threshold lies free there. A prefill
allocates and frees activations of a few MB per layer, so it kept faulting the same memory back in,
more so the longer the process ran: with mmfree-2.7b, batch 16 x 128 tokens, the third prefill in
one process took 0.7-1.8 M page faults and ran at 220-250 tok/s instead of 330 (a scratch loop of
prefills, 2026-11-22, this project's 2-core VM; the README has the ternary suite's figures).
`keep_freed_memory` fixes both thresholds, so blocks up to MMAP_THRESHOLD come from the heap and
up to TRIM_THRESHOLD of freed heap stays mapped for the next layer. The cost is resident memory: a
process may keep up to TRIM_THRESHOLD more than it uses at the moment.

The settings are process-wide. memwise applies them when it builds a model for the CPU;
MEMWISE_MALLOC_TUNING=0 leaves glibc's defaults alone.

`release_free_heap` is for loaders that quantize while they stream: each matrix's float temporaries
(tens of MB) are freed between small long-lived allocations, so glibc cannot trim the heap top and the
holes stay resident. Three loads of synthetic gpt2-medium int8 left 932-1,016 MiB resident without it,
four loads 916 MiB each with it (trimmed after every quantized matrix; 2026-12-05, docs/estimate.md).
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1   # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Sets the thresholds once per process; returns whether they are in force (glibc only)."""
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("MEMWISE_MALLOC_TUNING", "1") != "0" and platform.libc_ver()[0] == "glibc":
            mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
            if mallopt is not None:
                _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def release_free_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim; elsewhere nothing).

    Under glibc's default, moving threshold, a loop that allocates and frees matrices of a few to
    a few tens of MB one after another (the offload writer, a layer at a time) keeps the freed blocks
    and grows its resident memory layer after layer, past the budget it was writing for
    (tests/test_offload_write_memory.py). Trimming after each layer keeps it at one layer's."""
    if platform.libc_ver()[0] == "glibc":
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if trim is not None:
            trim(0)
