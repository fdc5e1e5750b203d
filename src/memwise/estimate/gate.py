"""The memory gate of whole runs: `memwise generate` and `memwise bench` refuse, in one line, a run whose
predicted peak (memwise.estimate) exceeds the memory available now, unless --force.

memory_gate.check_fits guards each allocation memwise makes (weights, a cache) as it is about to make
it; this gate looks at the whole run before anything is loaded, interpreter and activations included,
so that an hour-long bench or a generation is refused in a second instead of killed halfway.
MEMWISE_NO_MEMORY_CHECK=1 turns both off.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from memwise import memory_gate
from memwise.estimate.breakdown import Estimate
from memwise.memory_gate import OutOfMemoryError, format_bytes


def gate_disabled() -> bool:
    return os.environ.get("MEMWISE_NO_MEMORY_CHECK", "") not in ("", "0")


def check_predicted_peak(what: str, estimate: Estimate, device: str | torch.device = "cpu",
                         resident_now: int = 0) -> None:
    """Refuse `what` when its predicted peak, less what this process already holds of it
    (`resident_now`: the interpreter and libraries a fresh cell would load again), exceeds the memory
    `device` has available now."""
    if gate_disabled():
        return
    device = torch.device(device)
    needed = estimate.predicted_peak_bytes - (resident_now if device.type == "cpu" else 0)
    available = memory_gate.available_bytes(device)
    if needed > available:
        raise OutOfMemoryError(f"{what}: predicted peak {format_bytes(estimate.predicted_peak_bytes)} exceeds the "
                               f"{format_bytes(available)} of {device.type} memory available now "
                               "(`memwise estimate` shows the breakdown; --force runs it anyway)")


@contextmanager
def memory_checks_off() -> Iterator[None]:
    """--force: the per-allocation checks (memory_gate.check_fits) off too while the command runs,
    as MEMWISE_NO_MEMORY_CHECK=1 turns them off; the environment is restored afterwards."""
    previous = os.environ.get("MEMWISE_NO_MEMORY_CHECK")
    os.environ["MEMWISE_NO_MEMORY_CHECK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MEMWISE_NO_MEMORY_CHECK", None)
        else:
            os.environ["MEMWISE_NO_MEMORY_CHECK"] = previous
