"""The Decoder with int8 linears (scheme "int8", issue 19): which layers are quantized, the module
that holds them, and the bytes the quantized model holds.

Quantized: every Linear of the decoder layers (attn.qkv, attn.out, mlp.up, mlp.down) and the
lm_head (kept at 8 bits like llama.cpp's output tensor), each in the format of memwise.kernels.int8
(int8 [N, K padded to 64], a float32 scale and an int32 row sum per output row; biases stay
float32). Kept at the model's dtype for now: the embeddings, the position table, norms and
project_in/out. Where the checkpoint ties the lm_head to the input embedding (gpt2, opt, llama3),
the lookup keeps the float table and the lm_head is an int8 copy of it: the model holds 1 more byte
per embedding weight, and a decode step reads that byte instead of the float table.

Weights are quantized while the checkpoint streams, one tensor (or row slice of a fused matrix) at
a time: per-row scales make a row slice quantize the same alone as inside the whole matrix.
"""
from __future__ import annotations

import torch
from torch import nn

from memwise.kernels.int8 import Int8Matrix, int8_linear, padded_cols, quantize_weight
from memwise.models.decoder.layout import checkpoint_plan
from memwise.spec import ModelSpec, per_layer_linear

QUANTIZED = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")     # in each layer; and the lm_head
ROW_CHUNK = 4096    # rows quantized at a time: float temporaries stay small for a 50k-row lm_head


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per row and x quantized per token; the weights are buffers (not
    parameters: they are not trained), so that state_dict and weights_bytes() see them."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty((out_features, padded_cols(in_features)), dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.register_buffer("row_sums", torch.empty(out_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32)) if bias else None

    def matrix(self) -> Int8Matrix:
        return Int8Matrix(self.weight, self.scale, self.row_sums, self.out_features, self.in_features)

    def fill_rows(self, start: int, w: torch.Tensor) -> None:
        """Quantize float rows w [r, in_features] into output rows [start, start + r)."""
        for at in range(0, w.shape[0], ROW_CHUNK):
            q, scale = quantize_weight(w[at:at + ROW_CHUNK])
            first, end = start + at, start + at + q.shape[0]
            self.weight[first:end, :self.in_features] = q
            self.weight[first:end, self.in_features:] = 0
            self.scale[first:end] = scale
            self.row_sums[first:end] = q.sum(dim=1, dtype=torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.matrix(), self.bias).to(x.dtype)


def quantize_layers(model: nn.Module) -> None:
    """Swap the decoder layers' nn.Linear and the lm_head for empty Int8Linear (call on a meta model,
    before to_empty, so that float copies of these matrices are never allocated)."""
    owners = [(getattr(block, path.split(".")[0]), path.split(".")[1]) for block in model.layers for path in QUANTIZED]
    for owner, attr in owners + [(model, "lm_head")]:
        linear = getattr(owner, attr)
        with torch.device(linear.weight.device):
            setattr(owner, attr, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None))


def fill_tied_head(model: nn.Module) -> None:
    """A tied int8 lm_head: quantized from the loaded input embedding (rows chunked, never a float copy)."""
    if model.spec.tie_word_embeddings and isinstance(model.lm_head, Int8Linear):
        model.lm_head.fill_rows(0, model.embed.weight)


def int8_linears(model: nn.Module) -> dict[str, Int8Linear]:
    """"layers.i.attn.qkv.weight" (the checkpoint plan's parameter names) -> its Int8Linear."""
    return {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, Int8Linear)}


def _quantized_part(parameter: str) -> str | None:
    """"weight" or "bias" for a parameter of a quantized linear ("layers.3.mlp.up.bias"), else None."""
    parts = parameter.split(".")
    if parts[0] == "lm_head":
        return parts[1]
    if len(parts) == 5 and parts[0] == "layers" and ".".join(parts[2:4]) in QUANTIZED:
        return parts[4]
    return None


def int8_weights_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes the int8 model holds (what weights_bytes() returns): per quantized matrix N * Kp + 8 N,
    its bias in float32, everything else at `dtype`."""
    def count(s: ModelSpec) -> int:
        total = 0
        for source in checkpoint_plan(s):
            part = _quantized_part(source.parameter)
            if part == "weight":
                n, k = (source.shape[1], source.shape[0]) if source.transpose else source.shape
                total += n * padded_cols(k) + 8 * n
            else:
                total += source.loaded_numel() * (4 if part == "bias" else dtype.itemsize)
        if s.tie_word_embeddings:   # the int8 copy of the tied embedding
            total += s.vocab_size * padded_cols(s.embed_dim) + 8 * s.vocab_size
        return total
    return per_layer_linear(count, spec)


def quantized_weights_bytes(spec: ModelSpec, scheme: str, dtype: torch.dtype) -> int:
    """Bytes the model loaded with quantize=scheme holds (the family's size for the memory check and info)."""
    if scheme != "int8":
        raise ValueError(f"no {scheme!r} layout in the decoder family")
    return int8_weights_bytes(spec, dtype)
