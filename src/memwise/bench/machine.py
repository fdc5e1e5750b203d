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


def cpu_identity() -> str | None:
    """x86 vendor, family, model and stepping ("AuthenticAMD family 25 model 17 stepping 1"): a VM's
    model name often says only "AMD EPYC", and the family number tells the core generation apart."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return None
    if "cpu family" not in fields:
        return None
    return (f"{fields.get('vendor_id', '?')} family {fields['cpu family']} model {fields.get('model', '?')} "
            f"stepping {fields.get('stepping', '?')}")


def kernel_isa() -> str | None:
    """The instruction-set path memwise's kernels take here (MEMWISE_ISA applied), or None without them."""
    try:
        from memwise.kernels import isa_paths
        return isa_paths()[0]
    except Exception:  # an unbuilt extension or a bad MEMWISE_ISA: metadata must not fail on it
        return None


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
    """(bytes/s, how it was measured) of the memory the weights live in: device memory on CUDA,
    main memory through memwise's kernel library on the CPU."""
    if device.startswith("cuda"):
        return _cuda_read_bandwidth(device), f"torch sum over 1 GiB on {device}, best of 5"
    from memwise.kernels import read_bandwidth_bytes_per_s

    # refresh: it remembers its first answer otherwise, and the bench reads it before and after the cells
    return float(read_bandwidth_bytes_per_s(refresh=True)), "memwise.kernels.read_bandwidth_bytes_per_s"


def machine_metadata(command: str | None = None) -> dict[str, Any]:
    """The machine, its libraries, the date and the command line, for results.json's metadata."""
    import psutil

    return {
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu_model": cpu_model(),
        "cpu_identity": cpu_identity(),
        "kernel_isa": kernel_isa(),
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": int(psutil.virtual_memory().total),
        "available_ram_bytes": int(psutil.virtual_memory().available),
        "gpu": gpu_name(),
        "versions": library_versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
    }
