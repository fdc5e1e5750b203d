"""memwise.load's offloaded path: the request checked, then the family's offloaded model built."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from memwise.checkpoint import CheckpointReader
from memwise.errors import UnsupportedError
from memwise.offload.budget import parse_size
from memwise.offload.store import OffloadError

SUPPORTED_FAMILIES = ("memwise.models.decoder",)


def load_offloaded_model(resolved, reader: CheckpointReader | None, dtype: torch.dtype, device: torch.device,
                         quantize: str | None, seed: int, max_memory: str | int | None,
                         offload_dir: str | Path | None) -> torch.nn.Module:
    """The family's model with its layers streamed from `offload_dir` within `max_memory`."""
    if max_memory is None or offload_dir is None:
        given, missing = ("max_memory", "offload_dir") if offload_dir is None else ("offload_dir", "max_memory")
        raise OffloadError(f"{given} was given without {missing}: offloading needs both (e.g. "
                           "max_memory='2GiB', offload_dir='/var/tmp/memwise')")
    budget = parse_size(max_memory)
    if device.type != "cpu":
        raise UnsupportedError(f"offloading runs on the CPU for now (device {device} requested)")
    if resolved.family.__name__ not in SUPPORTED_FAMILIES:
        raise UnsupportedError(f"{resolved.where}: offloading supports the decoder family (gpt2, opt, phi, llama, "
                               f"mistral), not {resolved.spec.model_type} yet")
    from memwise.offload.decoder import OffloadRequest, load_offloaded
    # MEMWISE_OFFLOAD_DIRECT=0: ordinary reads (pages dropped after each), for comparisons and odd filesystems
    direct = os.environ.get("MEMWISE_OFFLOAD_DIRECT", "1") != "0"
    request = OffloadRequest(budget, Path(offload_dir).expanduser(), direct)
    from memwise.offload.runtime import PlannedRuntime
    model = load_offloaded(resolved.spec, reader, dtype, quantize, seed, request)
    # generation re-plans the load's split for its batch (memwise.offload.runtime)
    info = model.offload
    model.offload_runtime = PlannedRuntime(model, info.path, info.header, info.plan, quantize, info.direct)
    return model
