"""The Decoder with weights: a checkpoint's, streamed one tensor at a time, or random ones."""
from __future__ import annotations

import dataclasses
import re
import warnings

import torch

from memwise.checkpoint import CheckpointReader
from memwise.dtypes import parse_dtype
from memwise.errors import CheckpointError
from memwise.models.decoder.layout import TensorSource, checkpoint_plan
from memwise.models.decoder.modules import Decoder
from memwise.models.decoder.quantized import fill_tied_head, quantize_layers, quantized_linears
from memwise.spec import ModelSpec


def _build(spec: ModelSpec, dtype: str | torch.dtype, device: str | torch.device,
           quantize: str | None = None) -> Decoder:
    """The model with uninitialized weights in `dtype` on `device`, never allocated twice; with
    quantize=SCHEME its layers' linears are quantized (quantized.py) and never exist in float."""
    with torch.device("meta"):
        model = Decoder(spec)
    model = model.to(parse_dtype(dtype))
    if quantize is not None:
        quantize_layers(model, quantize)
    model = model.to_empty(device=torch.device(device))
    model.tie_weights()     # to_empty gives each module its own new tensor, breaking the tie
    model.init_rotary()
    return model.eval().requires_grad_(False)


def load(spec: ModelSpec, reader: CheckpointReader, dtype: str | torch.dtype = "float32",
         device: str | torch.device = "cpu", quantize: str | None = None) -> Decoder:
    """The model with the checkpoint's weights, read and converted (or quantized) one tensor at a time."""
    plan = checkpoint_plan(spec, reader)
    _check_plan(plan, reader, spec)
    model = _build(spec, dtype, device, quantize)
    parameters = dict(model.named_parameters())
    quantized = quantized_linears(model)
    sizes = {name: p.numel() for name, p in parameters.items()}
    sizes.update({name: m.out_features * m.in_features for name, m in quantized.items()})
    filled: dict[str, int] = {}
    with torch.no_grad():
        for source in plan:
            tensor = reader.read(source.name, source.shape)
            if source.transpose:
                tensor = tensor.t()
            if source.skip_rows:
                tensor = tensor[source.skip_rows:]
            if source.parameter in quantized:
                quantized[source.parameter].fill_rows(source.rows[0] if source.rows else 0, tensor)
                filled[source.parameter] = filled.get(source.parameter, 0) + tensor.numel()
                del tensor
                continue
            target = parameters[source.parameter]
            if source.rows is not None:
                target = target[source.rows[0]:source.rows[1]]
            target.copy_(tensor)
            filled[source.parameter] = filled.get(source.parameter, 0) + target.numel()
            del tensor
        fill_tied_head(model)
        if model.spec.tie_word_embeddings:
            filled["lm_head.weight"] = sizes.get("lm_head.weight", 0)
    unfilled = [name for name, size in sizes.items() if filled.get(name, 0) != size]
    if unfilled:  # a mapping bug, not a user's mistake, but never run on uninitialized memory
        raise CheckpointError(f"{reader.directory}: no checkpoint tensor for {', '.join(unfilled)}")
    return model


# Buffers that older transformers versions saved with the weights: never parameters.
_SAVED_BUFFERS = re.compile(r"(attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


def _check_plan(plan: list[TensorSource], reader: CheckpointReader, spec: ModelSpec) -> None:
    """Every tensor the model needs is in the checkpoint with its shape and a floating-point dtype
    (an integer tensor would load as huge values), checked before the model is allocated; tensors the
    model does not read are a sign that the config does not describe the weights, and are reported."""
    for source in plan:
        entry = reader.entry(source.name)
        if entry.shape != source.shape:
            raise CheckpointError(f"{entry.file}: tensor '{source.name}' has shape {list(entry.shape)}, "
                                  f"expected {list(source.shape)}")
        if not entry.dtype.is_floating_point:
            raise CheckpointError(f"{entry.file}: tensor '{source.name}' is {str(entry.dtype).removeprefix('torch.')}; "
                                  "a weight must be a floating-point tensor")
    read = {source.name for source in plan}
    unused = [name for name in reader.names() if name not in read and not _SAVED_BUFFERS.search(name)
              and not (spec.tie_word_embeddings and name == "lm_head.weight")]
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        warnings.warn(f"{reader.directory}: the checkpoint holds tensors this {spec.model_type} config does not "
                      f"use: {', '.join(unused[:3])}{more}", stacklevel=3)


def synthetic(spec: ModelSpec, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
              seed: int = 0, quantize: str | None = None) -> Decoder:
    """Random weights (normal, std 0.02; norms 1, biases 0), the same for a seed on any device and dtype.
    Quantized linears draw their matrices after all parameters, so their values differ from the float model's."""
    model = _build(dataclasses.replace(spec, synthetic=True), dtype, device, quantize)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.dim() == 1:
                parameter.fill_(1.0)
            else:
                # drawn in float32 on the CPU, one matrix at a time, so values do not depend on dtype/device
                parameter.copy_(torch.empty(parameter.shape).normal_(0.0, 0.02, generator=generator))
        for name, linear in quantized_linears(model).items():
            if name != "lm_head.weight" or not spec.tie_word_embeddings:
                linear.fill_rows(0, torch.empty(linear.out_features, linear.in_features).normal_(0.0, 0.02,
                                                                                               generator=generator))
        fill_tied_head(model)
    return model
