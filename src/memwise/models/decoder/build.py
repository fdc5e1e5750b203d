"""The Decoder with weights: a checkpoint's, streamed one tensor at a time, or random ones."""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Callable, Iterator

import torch

from memwise.checkpoint import CheckpointReader
from memwise.dtypes import parse_dtype
from memwise.errors import CheckpointError
from memwise.heap import release_free_heap
from memwise.kernels import KernelInputError
from memwise.models.decoder.dense import use_dense_kernels
from memwise.models.decoder.layout import TensorSource, checkpoint_plan
from memwise.models.decoder.modules import Decoder
from memwise.models.decoder.quantized import quantize_layers, quantized_linears
from memwise.spec import ModelSpec


def meta_model(spec: ModelSpec, dtype: str | torch.dtype, quantize: str | None = None,
               device: str | torch.device = "cpu") -> Decoder:
    """The model on the meta device (shapes and dtypes, no memory), its linears quantized when asked,
    the float linears left on the dense kernels where they apply on `device` (dense.py)."""
    with torch.device("meta"):
        model = Decoder(spec)
    model = model.to(parse_dtype(dtype))
    if quantize is not None:
        quantize_layers(model, quantize)
    use_dense_kernels(model, parse_dtype(dtype), torch.device(device))
    model.tie_weights()
    return model


def _build(spec: ModelSpec, dtype: str | torch.dtype, device: str | torch.device,
           quantize: str | None = None) -> Decoder:
    """The model with uninitialized weights in `dtype` on `device`, never allocated twice; with
    quantize=SCHEME its layers' linears are quantized (quantized.py) and never exist in float; the
    float linears left run decode steps on the dense kernels (dense.py)."""
    model = allocate(meta_model(spec, dtype, quantize, device), torch.device(device))
    model.tie_weights()     # each module got its own new tensor, breaking the tie
    model.init_rotary()
    return model.eval().requires_grad_(False)


def allocate(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Give every parameter and buffer of a meta model uninitialized memory on `device` (what
    Module.to_empty does). to_empty's empty_like of a meta tensor runs torch._refs, which imports
    torch.fx's symbolic shapes and sympy: 40 MiB of resident set for the process's lifetime;
    torch.empty of the shape does not."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                              requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return model


def load(spec: ModelSpec, reader: CheckpointReader, dtype: str | torch.dtype = "float32",
         device: str | torch.device = "cpu", quantize: str | None = None) -> Decoder:
    """The model with the checkpoint's weights, read and converted (or quantized) one tensor at a time."""
    plan = checkpoint_plan(spec, reader)
    check_plan(plan, reader, spec)
    model = _build(spec, dtype, device, quantize)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    sizes.update({name: m.out_features * m.in_features for name, m in quantized_linears(model).items()})
    filled = fill_from_checkpoint(model, plan, reader)
    if quantize is not None:
        release_free_heap()
    if model.spec.tie_word_embeddings:
        filled["lm_head.weight"] = sizes.get("lm_head.weight", 0)
    unfilled = [name for name, size in sizes.items() if filled.get(name, 0) != size]
    if unfilled:  # a mapping bug, not a user's mistake, but never run on uninitialized memory
        raise CheckpointError(f"{reader.directory}: no checkpoint tensor for {', '.join(unfilled)}")
    return model


def fill_from_checkpoint(model: Decoder, sources: list[TensorSource], reader: CheckpointReader) -> dict[str, int]:
    """Read `sources` into `model`'s (allocated) parameters, quantizing into quantized linears;
    elements filled per parameter. The offloaded load calls it one layer at a time."""
    quantized = quantized_linears(model)
    filled: dict[str, int] = {}
    with torch.no_grad():
        for source in sources:
            tensor = reader.read(source.name, source.shape)
            if source.transpose:
                tensor = tensor.t()
            if source.skip_rows:
                tensor = tensor[source.skip_rows:]
            if source.parameter in quantized:
                _fill_quantized(quantized[source.parameter], source, tensor, reader)
                filled[source.parameter] = filled.get(source.parameter, 0) + tensor.numel()
                del tensor
                release_free_heap()     # the quantizer's freed temporaries would stay resident (heap.py)
                continue
            target = model.get_parameter(source.parameter)
            if source.rows is not None:
                target = target[source.rows[0]:source.rows[1]]
            target.copy_(tensor)
            filled[source.parameter] = filled.get(source.parameter, 0) + target.numel()
            del tensor
    return filled


def _fill_quantized(linear, source: TensorSource, tensor: torch.Tensor, reader: CheckpointReader) -> None:
    """linear.fill_rows, with a weight the scheme cannot hold (int4's float16 group constants)
    reported against the checkpoint tensor it came from."""
    try:
        linear.fill_rows(source.rows[0] if source.rows else 0, tensor)
    except KernelInputError as error:
        raise CheckpointError(f"{reader.directory}: tensor '{source.name}': {error}") from None


# Buffers that older transformers versions saved with the weights: never parameters.
_SAVED_BUFFERS = re.compile(r"(attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


def check_plan(plan: list[TensorSource], reader: CheckpointReader, spec: ModelSpec) -> None:
    """Every tensor the model needs is in the checkpoint with its shape and a floating-point dtype
    (an integer tensor would load as huge values), checked before the model is allocated; tensors the
    model does not read are a sign that the config does not describe the weights, and are reported."""
    for source in plan:
        reader.expect(source.name, source.shape, floating=True)
    read = {source.name for source in plan}
    unused = [name for name in reader.names() if name not in read and not _SAVED_BUFFERS.search(name)
              and not (spec.tie_word_embeddings and name == "lm_head.weight")]
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        warnings.warn(f"{reader.directory}: the checkpoint holds tensors this {spec.model_type} config does not "
                      f"use: {', '.join(unused[:3])}{more}", stacklevel=3)


def synthetic(spec: ModelSpec, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
              seed: int = 0, quantize: str | None = None) -> Decoder:
    """Random weights (normal, std 0.02; norms 1, biases 0), the same for a seed on any device and dtype;
    a quantized model holds the same matrices, quantized."""
    model = _build(dataclasses.replace(spec, synthetic=True), dtype, device, quantize)
    parameters = dict(model.named_parameters())
    quantized = quantized_linears(model)
    with torch.no_grad():
        for name, start, tensor in synthetic_row_blocks(spec, seed, into=parameters.get, by_rows=quantized.__contains__):
            if name in quantized:
                quantized[name].fill_rows(start, tensor)
                release_free_heap()     # the quantizer's freed temporaries would stay resident (heap.py)
            elif parameters[name].data_ptr() != tensor.data_ptr():      # not drawn in place
                parameters[name].copy_(tensor)
            del tensor
    if quantize is not None:
        release_free_heap()
    return model


def parameter_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the Decoder, in named_parameters order (a tied matrix once)."""
    with torch.device("meta"):
        model = Decoder(spec)
    model.tie_weights()
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def synthetic_tensors(spec: ModelSpec, seed: int = 0,
                      into: Callable[[str], torch.Tensor | None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The random weights of `synthetic`, one float32 CPU tensor at a time, so that an exporter (GGUF)
    can write the very weights memwise runs without holding the whole model. `into(name)` may give a
    float32 tensor of the parameter's shape (the model's own memory) to draw the matrix straight into,
    with the same values: a writer then never holds a second copy of a large matrix (the embedding)."""
    for name, _, tensor in synthetic_row_blocks(spec, seed, into):
        yield name, tensor


# Rows drawn at a time by synthetic_row_blocks: about this many weights (4 MiB of float32).
DRAW_WEIGHTS = 1 << 20


def draw_row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """(start, end) row blocks of a [rows, cols] matrix whose separate draws equal one draw of the whole.

    torch's CPU normal_ fills a contiguous tensor of 16 or more numbers with uniforms in order and
    turns them into normals 16 at a time (redrawing the last 16 when the count is not a multiple of
    16): blocks of a multiple of 16 numbers, the last one at least 16, consume and transform the
    generator's stream exactly as the whole does. tests/test_synthetic_draw.py checks this."""
    step = max(1, DRAW_WEIGHTS // max(cols, 1))
    while (step * cols) % 16:
        step += 1
    blocks = [(at, min(at + step, rows)) for at in range(0, rows, step)]
    if len(blocks) > 1 and (blocks[-1][1] - blocks[-1][0]) * cols < 16:
        blocks[-2:] = [(blocks[-2][0], rows)]     # a tail under 16 numbers would take torch's other path
    return blocks


def synthetic_row_blocks(spec: ModelSpec, seed: int = 0,
                         into: Callable[[str], torch.Tensor | None] | None = None,
                         by_rows: Callable[[str], bool] | None = None
                         ) -> Iterator[tuple[str, int, torch.Tensor]]:
    """synthetic_tensors as (name, first row, tensor); a matrix for which `by_rows(name)` is true comes
    in row blocks of about DRAW_WEIGHTS numbers, with the same values, so that a quantizing loader
    never holds the whole float32 matrix (the embedding)."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape in parameter_shapes(spec):
        if name.endswith("bias"):
            yield name, 0, torch.zeros(shape)
        elif len(shape) == 1:
            yield name, 0, torch.ones(shape)
        elif by_rows is not None and by_rows(name) and len(shape) == 2:
            for start, end in draw_row_blocks(*shape):
                yield name, start, torch.empty(end - start, shape[1]).normal_(0.0, 0.02, generator=generator)
        else:
            target = into(name) if into is not None else None
            if target is None or target.dtype != torch.float32 or tuple(target.shape) != shape \
                    or not target.is_contiguous():
                target = torch.empty(shape)
            # drawn in float32 on the CPU, one matrix at a time, so values do not depend on dtype/device
            yield name, 0, target.normal_(0.0, 0.02, generator=generator)
