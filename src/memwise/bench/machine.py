"""What machine the numbers come from: CPU, memory, GPU, library versions, and its read bandwidth."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from typing import Any

LIBRARIES = ("memwise", "torch", "transformers", "numpy", "safetensors", "tokenizers", "psutil", "rich",
             "matplotlib")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _numpy_read_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of summing a buffer much larger than the caches; the best of a few passes.

    One thread reads, so on machines whose bandwidth needs several cores to saturate this is a
    lower bound (and the ceiling derived from it is too).
    """
    import numpy as np

    data = np.ones(nbytes // 8, dtype=np.float64)
    data.sum()  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def _cuda_read_bandwidth(device: str, nbytes: int = 2**30, repeats: int = 5) -> float:
    import torch

    data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    data.sum()
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del data
    torch.cuda.empty_cache()
    return nbytes / best


def read_bandwidth(device: str = "cpu") -> tuple[float, str]:
    """(bytes/s, how it was measured) of the memory the weights live in: device memory on CUDA;
    on the CPU memwise's kernel helper when present, else a numpy pass."""
    if device.startswith("cuda"):
        return _cuda_read_bandwidth(device), f"torch sum over 1 GiB on {device}, best of 5"
    try:
        from memwise.kernels import read_bandwidth_bytes_per_s
    except ImportError:
        return _numpy_read_bandwidth(), "numpy sum over 256 MiB, best of 5, one thread"
    try:
        value = read_bandwidth_bytes_per_s(refresh=True)   # it remembers its first answer otherwise
    except TypeError:
        value = read_bandwidth_bytes_per_s()
    return float(value), "memwise.kernels.read_bandwidth_bytes_per_s"


def machine_metadata(command: str | None = None) -> dict[str, Any]:
    """The machine, its libraries, the date and the command line, for results.json's metadata."""
    import psutil

    return {
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": int(psutil.virtual_memory().total),
        "available_ram_bytes": int(psutil.virtual_memory().available),
        "gpu": gpu_name(),
        "versions": library_versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
    }
