"""The Decoder with quantized linears (schemes "int8", "int4", "nf4"; issue 19): which layers are
quantized, the modules that hold them, and the bytes the quantized model holds.

Quantized: every Linear of the decoder layers (attn.qkv, attn.out, mlp.up, mlp.down) in the
scheme's format (memwise.kernels.int8, .int4 or .nf4; Int8Linear, Int4Linear, Nf4Linear), and the
lm_head, which is int8 under every scheme (HEAD_SCHEME): like llama.cpp's output tensor, the last
projection is kept at 8 bits because 4-bit rounding there moves every logit directly, and at int8
it is a small share of a decode step's bytes for models of a few hundred million parameters and up.
The token embedding is int8 too under every scheme (Int8Embedding: the int8 layout, one scale per
row, looked up by dequantizing only the rows of the tokens asked for). Where the checkpoint ties the
lm_head to the embedding (gpt2, opt, llama3), both are one set of int8 tensors (Decoder.tie_weights):
a float table for the lookup plus an int8 copy for the head would hold 5 bytes per embedding weight
instead of 1 (opt-2.7b: 491 MiB of float table). Biases stay float32; the position table (gpt2,
opt), norms and project_in/out stay at the model's dtype (opt-2.7b's position table is 20 MiB).

Weights are quantized while the checkpoint streams, one tensor (or row slice of a fused matrix) at
a time: int8's per-row and int4's per-row-group constants make a row slice quantize the same alone
as inside the whole matrix. nf4 cannot (its double quantization subtracts the mean absmax of the
whole matrix), so an Nf4Linear gathers a fused matrix's slices in float32 and quantizes it once the
last slice arrives: one float matrix at a time, the largest layer matrix, never the model.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from memwise.kernels import int4, int8, nf4, num_threads
from memwise.kernels.int8 import Int8Matrix, padded_cols, quantize_weight
from memwise.kernels.threads import CpuBudget
from memwise.models.decoder.layout import checkpoint_plan
from memwise.spec import ModelSpec, per_layer_linear

QUANTIZED = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")     # in each layer; and the lm_head
# Weights quantized at a time: the quantizers make a few float temporaries of their input's size,
# so a chunk of whole rows of about this many weights (4 MiB of float32) bounds them whatever the
# matrix (4096 rows of opt-2.7b's 10240 columns were 160 MiB each, above the load's other transients).
CHUNK_WEIGHTS = 1 << 20
HEAD_SCHEME = "int8"


def _product(linear: nn.Module, x: torch.Tensor, names: tuple[str, ...], make) -> torch.Tensor:
    """linear's product through the kernel `make()` returns (int8 / int4 linear_kernel: the checks of
    weights and bias done once and their pointers kept), kept while the same tensors are in place: a
    decode step makes ~100 products, and the checks cost more than a small matrix's product. A move
    (.to, _apply) or a new tensor assigned to a buffer or the bias makes a new one. Threads: the
    model's CpuBudget."""
    tensors = tuple(linear._buffers[name] for name in names) + (linear._parameters.get("bias"),)
    kernel = linear.__dict__.get("_kernel")
    if kernel is None or any(a is not b for a, b in zip(kernel[0], tensors)):
        kernel = linear.__dict__["_kernel"] = (tensors, make())
    threads = None if linear.budget is None else linear.budget.threads(num_threads())
    y = kernel[1](x, threads)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class _KernelLinear(nn.Module):
    """What Int8Linear and Int4Linear share: the model's CpuBudget, and a cached kernel (_product)
    dropped when the module's tensors move (whose storage changes under the same Parameter)."""

    budget: CpuBudget | None = None     # shared by the model's quantized linears (quantize_layers)
    # Each token's row is quantized and summed on its own, in a fixed order (int8.py, int4.py): a
    # product over some of the tokens gives those tokens' rows exactly (MLP's token chunks rely on it).
    per_token_exact = True

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_kernel", None)
        return super()._apply(fn, recurse)


def row_chunks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the row chunks that `fill_rows` quantizes one at a time (per-row constants
    make a chunk quantize the same alone as inside its matrix)."""
    step = max(1, CHUNK_WEIGHTS // max(cols, 1))
    for at in range(0, rows, step):
        yield at, min(at + step, rows)


class Int8Linear(_KernelLinear):
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
        for at, stop in row_chunks(*w.shape):
            q, scale = quantize_weight(w[at:stop])
            first, end = start + at, start + at + q.shape[0]
            self.weight[first:end, :self.in_features] = q
            self.weight[first:end, self.in_features:] = 0
            self.scale[first:end] = scale
            self.row_sums[first:end] = q.sum(dim=1, dtype=torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _product(self, x, ("weight", "scale", "row_sums"), lambda: int8.linear_kernel(self.matrix(), self.bias))


class Int8Embedding(Int8Linear):
    """The token embedding [vocab, dim] at 8 bits: an Int8Linear's tensors (int8 rows padded to 64
    columns, a float32 scale and int32 sum per row), so that a tied lm_head can be these very tensors.
    A lookup dequantizes only the rows of the tokens asked for: row * scale, in float32, then the
    model's dtype (the same products as dequantizing the table, so the same values)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, output_dtype: torch.dtype):
        super().__init__(embedding_dim, num_embeddings, bias=False)
        self.output_dtype = output_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[input_ids, :self.in_features].float()
        return (rows * self.scale[input_ids].unsqueeze(-1)).to(self.output_dtype)

    def dequantized(self) -> torch.Tensor:
        """The whole table in float32 [vocab, dim] (for checks; the model never builds it)."""
        return self.weight[:, :self.in_features].float() * self.scale[:, None]


class Int4Linear(_KernelLinear):
    """y = x W^T + b with W in 4-bit groups (memwise.kernels.int4) and x quantized per token to int8."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kp = int4.padded_cols(in_features)
        self.register_buffer("codes", torch.empty((out_features, kp // 2), dtype=torch.uint8))
        self.register_buffer("params", torch.empty((out_features, kp // int4.GROUP, 2), dtype=torch.float16))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32)) if bias else None

    def matrix(self) -> int4.Int4Matrix:
        return int4.Int4Matrix(self.codes, self.params, self.out_features, self.in_features)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() cast every floating buffer; the float16 constants are a format, not the
        # model's dtype, so they travel as their bits (a device move still applies)
        self._buffers["params"] = self._buffers["params"].view(torch.int16)
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers["params"] = self._buffers["params"].view(torch.float16)

    def fill_rows(self, start: int, w: torch.Tensor) -> None:
        for at, stop in row_chunks(*w.shape):
            codes, params = int4.quantize_weight(w[at:stop], first_row=start + at)
            first, end = start + at, start + at + codes.shape[0]
            self.codes[first:end] = int4.pack_codes(codes)
            self.params[first:end] = params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _product(self, x, ("codes", "params"), lambda: int4.linear_kernel(self.matrix(), self.bias))


class Nf4Linear(nn.Module):
    """y = x W^T + b with W in bitsandbytes' NF4 (memwise.kernels.nf4), x in float32."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        blocks = out_features * nf4.padded_cols(in_features) // nf4.BLOCK
        self.register_buffer("codes", torch.empty((out_features, nf4.padded_cols(in_features) // 2), dtype=torch.uint8))
        self.register_buffer("qabs", torch.empty(blocks, dtype=torch.uint8))
        self.register_buffer("absmax2", torch.empty(-(-blocks // nf4.BLOCK2), dtype=torch.float32))
        self.register_buffer("offset", torch.empty(1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32)) if bias else None
        self._staged: torch.Tensor | None = None   # float rows of a fused matrix until the last arrives
        self._filled = 0

    def matrix(self) -> nf4.Nf4Matrix:
        return nf4.Nf4Matrix(self.codes, self.qabs, self.absmax2, self.offset, self.out_features, self.in_features)

    def fill_rows(self, start: int, w: torch.Tensor) -> None:
        if start == 0 and w.shape[0] == self.out_features:
            self._quantize(w)
            return
        if self._staged is None:
            self._staged = torch.empty((self.out_features, self.in_features), dtype=torch.float32)
        self._staged[start:start + w.shape[0]] = w
        self._filled += w.shape[0]
        if self._filled >= self.out_features:
            staged, self._staged, self._filled = self._staged, None, 0
            self._quantize(staged)

    def _quantize(self, w: torch.Tensor) -> None:
        codes, qabs, absmax2, offset = nf4.quantize_weight(w)
        self.codes.copy_(codes)
        self.qabs.copy_(qabs)
        self.absmax2.copy_(absmax2)
        self.offset.copy_(offset.reshape(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4.nf4_linear(x, self.matrix(), self.bias).to(x.dtype)


LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": Nf4Linear}
QuantizedLinear = Int8Linear | Int4Linear | Nf4Linear


def quantize_layers(model: nn.Module, scheme: str) -> None:
    """Swap the decoder layers' nn.Linear for empty `scheme` linears, the lm_head for an empty
    Int8Linear and the token embedding for an empty Int8Embedding (call on a meta model, before its
    memory is allocated, so that float copies are never allocated); a tied lm_head then shares the
    embedding's tensors (Decoder.tie_weights)."""
    embed = model.embed
    with torch.device(embed.weight.device):
        model.embed = Int8Embedding(embed.num_embeddings, embed.embedding_dim, embed.weight.dtype)
    owners = [(getattr(block, path.split(".")[0]), path.split(".")[1]) for block in model.layers for path in QUANTIZED]
    budget = CpuBudget()    # each product waits for its slowest thread: one per core others leave free
    for (owner, attr), kind in [(o, scheme) for o in owners] + [((model, "lm_head"), HEAD_SCHEME)]:
        linear = getattr(owner, attr)
        with torch.device(linear.weight.device):
            replacement = LINEARS[kind](linear.in_features, linear.out_features, linear.bias is not None)
        if kind != "nf4":
            replacement.budget = budget
        setattr(owner, attr, replacement)


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    """"layers.i.attn.qkv.weight" (the checkpoint plan's parameter names) -> its quantized linear."""
    return {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, tuple(LINEARS.values()))}


int8_linears = quantized_linears    # the int8 branch's name, for code that still calls it


def _quantized_part(parameter: str) -> str | None:
    """"weight" or "bias" for a parameter of a quantized linear ("layers.3.mlp.up.bias"), else None."""
    parts = parameter.split(".")
    if parts[0] in ("lm_head", "embed"):
        return parts[1]
    if len(parts) == 5 and parts[0] == "layers" and ".".join(parts[2:4]) in QUANTIZED:
        return parts[4]
    return None


def matrix_bytes(scheme: str, n: int, k: int) -> int:
    """Bytes one quantized [n, k] matrix holds in `scheme` (its bias not included)."""
    if scheme == "int8":
        return n * padded_cols(k) + 8 * n
    if scheme == "int4":
        return n * int4.padded_cols(k) // 2 + 4 * n * (int4.padded_cols(k) // int4.GROUP)
    blocks = n * nf4.padded_cols(k) // nf4.BLOCK
    return n * nf4.padded_cols(k) // 2 + blocks + 4 * -(-blocks // nf4.BLOCK2) + 4


def scheme_weights_bytes(spec: ModelSpec, scheme: str, dtype: torch.dtype) -> int:
    """Bytes the model loaded with quantize=scheme holds (what weights_bytes() returns): the layers'
    matrices in `scheme`, the token embedding and the lm_head in int8 (one matrix when tied), biases
    in float32, everything else at `dtype`."""
    def count(s: ModelSpec) -> int:
        total, shapes = 0, {}
        for source in checkpoint_plan(s):
            part = _quantized_part(source.parameter)
            if part == "weight":   # a fused matrix's row slices add up to one matrix (nf4's constants are per matrix)
                n, k = (source.shape[1], source.shape[0]) if source.transpose else source.shape
                rows = shapes.get(source.parameter, (0, k))[0]
                shapes[source.parameter] = (rows + n, k)
            else:
                total += source.loaded_numel() * (4 if part == "bias" else dtype.itemsize)
        for parameter, (n, k) in shapes.items():
            total += matrix_bytes(HEAD_SCHEME if parameter.startswith(("lm_head", "embed")) else scheme, n, k)
        return total
    return per_layer_linear(count, spec)


def int8_weights_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    return scheme_weights_bytes(spec, "int8", dtype)


def quantized_weights_bytes(spec: ModelSpec, scheme: str, dtype: torch.dtype) -> int:
    """Bytes the model loaded with quantize=scheme holds (the family's size for the memory check and info)."""
    if scheme not in LINEARS:
        raise ValueError(f"no {scheme!r} layout in the decoder family")
    return scheme_weights_bytes(spec, scheme, dtype)
