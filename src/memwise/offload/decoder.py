"""An offloaded decoder-family model: its offload file written (once) from the checkpoint or preset one
layer at a time, then opened with the layers that fit the budget resident and the rest streamed.

The non-layer weights live in the file's last region and are read into memory whole; each layer's
tensors become zero-copy views of a buffer (memwise.offload.stream.bind), so the streamed model runs
the very same modules, on the very same bytes, as the in-memory one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
import weakref
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from memwise.checkpoint import CheckpointReader
from memwise.heap import release_free_heap
from memwise.models.decoder.build import check_plan, fill_from_checkpoint, meta_model, synthetic_row_blocks
from memwise.models.decoder.layout import checkpoint_plan
from memwise.models.decoder.modules import Decoder
from memwise.models.decoder.quantized import quantized_linears
from memwise.offload.budget import WORKSPACE_TOKENS, BudgetPlan, plan_budget
from memwise.offload.files import check_directory, check_free_space, store_path
from memwise.offload.store import (FORMAT_VERSION, StaleStoreError, StoreHeader, StoreWriter, layout,
                                   read_header, remove_abandoned, tensor_table, verify_regions, views)
from memwise.offload.stream import AlignedBuffer, LayerStream, RegionReader, bind, spread_resident
from memwise.spec import ModelSpec

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class OffloadRequest:
    budget: int
    directory: Path
    direct: bool = True         # O_DIRECT reads (False: ordinary reads, pages dropped after each)


def state_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's parameters and buffers, each tensor once (a tied matrix under its first name)."""
    seen: set[int] = set()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor


def expected_header(model: Decoder, source: str, dtype: torch.dtype, scheme: str | None, seed: int,
                    reader: CheckpointReader | None) -> StoreHeader:
    layer_slots, layer_size = tensor_table((n, t.dtype, tuple(t.shape)) for n, t in state_tensors(model.layers[0]))
    rest = [(n, t) for n, t in state_tensors(model) if not _LAYER.match(n)]
    rest_slots, rest_size = tensor_table((n, t.dtype, tuple(t.shape)) for n, t in rest)
    spec_fields = {k: v for k, v in dataclasses.asdict(model.spec).items() if k not in ("source",)}
    identity = json.dumps({"spec": spec_fields, "dtype": str(dtype), "scheme": scheme,
                           "seed": seed if reader is None else None}, sort_keys=True, default=str)
    header = StoreHeader(source, hashlib.sha256(identity.encode()).hexdigest(), _fingerprint(reader),
                         scheme or "none", str(dtype).removeprefix("torch."), layer_slots, rest_slots, [], None)
    return layout(header, model.spec.num_layers, layer_size, rest_size)


def _fingerprint(reader: CheckpointReader | None) -> str:
    if reader is None:
        return "synthetic"
    files = sorted(p for p in Path(reader.directory).iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return hashlib.sha256(json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()


def workspace_bytes(model: Decoder) -> int:
    """KV cache, activations and logits of a WORKSPACE_TOKENS-token prompt at batch 1."""
    spec, tokens = model.spec, WORKSPACE_TOKENS
    itemsize = 4 if model.dtype == torch.float32 else 2
    inner = spec.intermediate_size * (2 if spec.gated_mlp else 1)
    activations = tokens * (6 * spec.hidden_size + 3 * spec.num_heads * spec.head_dim + 2 * inner) * itemsize
    return model.cache_bytes(1, tokens) + activations + tokens * spec.vocab_size * 4


def budget_plan(spec: ModelSpec, dtype: torch.dtype, quantize: str | None, budget: int) -> BudgetPlan:
    """How an offloaded load of `spec` would spend `budget` (no weights read, nothing written)."""
    model = meta_model(spec, dtype, quantize)
    header = expected_header(model, spec.source, dtype, quantize, 0, None)
    return plan_budget(budget, header.rest.size, header.layers[0].size, workspace_bytes(model),
                       spec.num_layers, spec.source)


def load_offloaded(spec: ModelSpec, reader: CheckpointReader | None, dtype: torch.dtype, quantize: str | None,
                   seed: int, request: OffloadRequest) -> Decoder:
    """The Decoder whose layers stream from `request.directory` within `request.budget` bytes."""
    model = meta_model(spec, dtype, quantize).eval().requires_grad_(False)
    header = expected_header(model, spec.source, dtype, quantize, seed, reader)
    plan = plan_budget(request.budget, header.rest.size, header.layers[0].size, workspace_bytes(model),
                       spec.num_layers, spec.source)
    if reader is not None:
        check_plan(checkpoint_plan(spec, reader), reader, spec)
    path = store_path(request.directory, spec.source, header.dtype, header.scheme)
    header = _valid_or_rebuilt(path, header, model, reader, seed, request)
    return _open(model, path, header, plan, request.direct)


def _valid_or_rebuilt(path: Path, expect: StoreHeader, model: Decoder, reader: CheckpointReader | None,
                      seed: int, request: OffloadRequest) -> StoreHeader:
    check_directory(request.directory)
    remove_abandoned(path)
    if path.exists():
        try:
            header = read_header(path, expect)
            _verify(path, header, request.direct)
            return header
        except StaleStoreError as e:
            warnings.warn(f"{e}; rebuilding it", stacklevel=4)
    check_free_space(request.directory, expect, path)
    return write_store(path, expect, model, reader, seed)


def _verify(path: Path, header: StoreHeader, direct: bool) -> None:
    reader = RegionReader(path, direct)
    try:
        buffer = AlignedBuffer.allocate(max(header.rest.size, header.layers[0].size))
        verify_regions(header, lambda region: reader.read_into(region, buffer), path)
    finally:
        reader.close()


def write_store(path: Path, header: StoreHeader, model: Decoder, reader: CheckpointReader | None,
                seed: int) -> StoreHeader:
    """Write the offload file one layer at a time. The tensors being filled are views of the region
    buffers themselves (a layer's, reused, and the non-layer weights'), so a layer is quantized or
    copied straight into the bytes that are written, and a preset's float32 matrices are drawn
    straight into them: the writer holds the non-layer weights, one layer, and one source tensor
    (a checkpoint tensor, or a float matrix of a layer being quantized) at a time, the heap trimmed
    after each layer. The non-layer weights are written last."""
    writer = StoreWriter(path, header)
    try:
        rest = AlignedBuffer.allocate(header.rest.size)
        bind(model, views(rest.tensor, header.rest_tensors))
        model.tie_weights()
        layer = AlignedBuffer.allocate(header.layers[0].size)

        def materialize(index: int) -> None:
            layer.tensor.zero_()        # the gaps between tensors: zeros, so that the CRC is the file's
            bind(model.layers[index], views(layer.tensor, header.layer_tensors))

        def finish(index: int) -> None:
            writer.write_region(index, layer.view[:header.layers[index].size])
            model.layers[index].to_empty(device="meta")
            release_free_heap()

        _fill_layers(model, reader, seed, materialize, finish)
        writer.write_region(None, rest.view[:header.rest.size])
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        model.to_empty(device="meta")
        release_free_heap()


def _fill_layers(model: Decoder, reader: CheckpointReader | None, seed: int,
                 materialize: Callable[[int], None], finish: Callable[[int], None]) -> None:
    """Fill the non-layer weights and the layers, one layer at a time: `materialize(i)` gives layer i
    its memory before it is filled, `finish(i)` takes it once it is complete (to write and free it)."""
    if reader is not None:
        plan = checkpoint_plan(model.spec, reader)
        fill_from_checkpoint(model, [s for s in plan if not _LAYER.match(s.parameter)], reader)
        for index in range(model.spec.num_layers):
            materialize(index)
            fill_from_checkpoint(model, [s for s in plan if s.parameter.startswith(f"layers.{index}.")], reader)
            finish(index)
        return
    quantized = quantized_linears(model)
    current: list[int] = []     # the layer being filled

    def target(name: str) -> torch.Tensor | None:
        # called before each matrix is drawn: a new layer's first matrix completes the previous layer
        match = _LAYER.match(name)
        if match and (not current or current[-1] != int(match.group(1))):
            if current:
                finish(current[-1])
            current.append(int(match.group(1)))
            materialize(current[-1])
        return None if name in quantized else model.get_parameter(name)

    with torch.no_grad():
        # a quantized matrix comes in row blocks (never its whole float32 self: the embedding)
        for name, start, tensor in synthetic_row_blocks(model.spec, seed, into=target, by_rows=quantized.__contains__):
            if name in quantized:
                if start == 0:
                    target(name)        # a new layer's first matrix completes the previous layer
                quantized[name].fill_rows(start, tensor)
            else:
                destination = target(name)
                if destination.data_ptr() != tensor.data_ptr():    # not drawn in place
                    destination.copy_(tensor)
            del tensor
    if current:
        finish(current[-1])


def _open(model: Decoder, path: Path, header: StoreHeader, plan: BudgetPlan, direct: bool) -> Decoder:
    reader = RegionReader(path, direct)
    rest = AlignedBuffer.allocate(header.rest.size)
    reader.read_into(header.rest, rest)
    bind(model, views(rest.tensor, header.rest_tensors))
    model.tie_weights()
    model.init_rotary()
    resident = spread_resident(len(header.layers), plan.resident)
    model.layer_stream = LayerStream(reader, header.layers, header.layer_tensors, resident, plan.buffers)
    # the I/O threads and the file end with the model (the streams hold no reference back to it); the
    # runtime replaces the stream when a plan changes the resident layers
    model.offload_streams = [model.layer_stream]
    weakref.finalize(model, _close_streams, model.offload_streams)
    model.offload = OffloadInfo(path, plan, reader.fallback_reason, FORMAT_VERSION, header, direct)
    model._offload_rest = rest       # the non-layer weights' memory lives as long as the model
    return model


def _close_streams(streams: list[LayerStream]) -> None:
    for stream in streams:
        stream.close()


@dataclasses.dataclass(frozen=True)
class OffloadInfo:
    path: Path
    plan: BudgetPlan
    fallback_reason: str | None     # why reads are not O_DIRECT (None: they are)
    format_version: int
    header: StoreHeader | None = None
    direct: bool = True             # O_DIRECT asked for
