"""The memory gate: what a load or a generation would allocate, checked against what the device has,
before anything is allocated.

Without it, a config that claims 10^9 layers or a `max_new_tokens` of 10^12 ends deep inside torch
(an allocation failure, or the kernel's OOM killer minutes later). With it, the request is refused in
one line that gives both numbers. The figures are the family's own (ModelSpec-based, computed in
constant time whatever the layer count); they count what memwise allocates, not the interpreter and
libraries around it, so a request that passes can still be tight.

MEMWISE_NO_MEMORY_CHECK=1 skips the gate (for machines whose swap or overcommit make "available" too
pessimistic).
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch

from memwise.errors import MemwiseError
from memwise.spec import ModelSpec

CGROUP = Path("/sys/fs/cgroup")


class OutOfMemoryError(MemwiseError):
    """A request needs more memory than the device has available."""


def weights_bytes(family: ModuleType, spec: ModelSpec, dtype: torch.dtype, quantize: str | None = None) -> int:
    """Bytes the family's model holds for weights at `dtype`: the dtype's size for dense families,
    the packed size for families that store weights packed whatever the activations' dtype, the
    quantized size when a scheme is given."""
    if quantize is not None:
        return int(family.quantized_weights_bytes(spec, quantize, dtype))
    sizes = family.weight_sizes(spec)
    name = str(dtype).removeprefix("torch.")
    if name in sizes:
        return int(sizes[name])
    packed = [size for kind, size in sizes.items() if "packed" in kind]
    return int(packed[0]) if packed else int(max(sizes.values()))


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can get on `device`: free GPU memory, or the host's available memory
    capped by this process's cgroup limit (a container's limit is smaller than the host's RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    available = int(psutil.virtual_memory().available)
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            used = int((CGROUP / "memory.current").read_text())
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return available


def check_fits(what: str, parts: dict[str, int], device: torch.device) -> None:
    """Refuse `what` when its parts (name -> bytes) add up to more than `device` has available."""
    if os.environ.get("MEMWISE_NO_MEMORY_CHECK", "") not in ("", "0"):
        return
    needed = sum(parts.values())
    available = available_bytes(device)
    if needed > available:
        detail = " + ".join(f"{name} {format_bytes(size)}" for name, size in parts.items() if size)
        raise OutOfMemoryError(f"{what} needs {format_bytes(needed)} ({detail}), but {device.type} has "
                               f"{format_bytes(available)} available (MEMWISE_NO_MEMORY_CHECK=1 tries anyway)")


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1e4 else f"{value:.3e} {unit}"
    return f"{n} B"
