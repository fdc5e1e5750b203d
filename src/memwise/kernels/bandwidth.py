"""The machine's memory read bandwidth, the ceiling of decode speed (tokens/s <= bandwidth / bytes read per token)."""
from __future__ import annotations

import os
import threading
import time

try:
    from memwise.kernels import _ternary as _c
except ImportError:
    _c = None

_bandwidth: float | None = None
_bandwidth_lock = threading.Lock()


def last_level_cache_bytes() -> int:
    """Bytes of the largest CPU cache (0 where sysfs does not say): weights larger than this stream from DRAM."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
            best = max(best, value)
    except (OSError, ValueError):
        pass
    return best


def dram_buffer_bytes() -> int:
    """Twice the last-level cache (at least 256 MiB) so every pass streams from DRAM; capped by
    the memory actually free."""
    size = max(256 << 20, 2 * last_level_cache_bytes())
    try:
        import psutil
        size = min(size, psutil.virtual_memory().available // 4)
    except Exception:  # noqa: BLE001 - psutil missing or unreadable: keep the cache-based size
        pass
    return max(size, 64 << 20)


def read_bandwidth_bytes_per_s(refresh: bool = False) -> float:
    """Measured memory read bandwidth of this machine in bytes/s (all threads, best of 5 passes).

    Measured once per process (about a second) and then remembered; refresh=True measures again.
    """
    global _bandwidth
    import torch    # measured with torch's thread count; this module itself stays torch-free

    with _bandwidth_lock:
        if _bandwidth is None or refresh:
            nbytes = dram_buffer_bytes()
            if _c is not None:
                _bandwidth = float(_c.read_bandwidth(nbytes, 5, max(1, torch.get_num_threads())))
            else:
                _bandwidth = _torch_read_bandwidth(nbytes)
        return _bandwidth


def _torch_read_bandwidth(nbytes: int) -> float:
    import torch

    buf = torch.ones(nbytes // 8, dtype=torch.int64)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 8 / best
