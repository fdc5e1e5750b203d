"""The decoder's preallocated KV cache, in the model's dtype or quantized (kv_cache="int8" | "int4").

Batches are left-padded. The cache remembers which slots hold real tokens; a token's position is the
number of real tokens before it (Hugging Face's cumsum(mask) - 1 during generate), so a prompt gives
the same logits alone and in a padded batch.

A quantized cache stores each layer's keys and values in the block layout of memwise.kernels.kv_quant
(group-wise along head_dim). Attention reads it quantized: each step, each layer dequantizes the slots
in use, and only those, into a temporary of the model's dtype that lives for that layer's attention.
"""
from __future__ import annotations

import torch

from memwise.kernels import kv_quant
from memwise.spec import ModelSpec


class DecoderCache:
    """Preallocated keys and values of every layer, [B, kv_heads, max_length, head_dim] each.

    Slots are shared by the batch (slot s is the s-th token given to forward for every row); `mask`
    says which slots hold real tokens and `real_count` how many real tokens each row has so far.
    """
    scheme: str | None = None

    def __init__(self, spec: ModelSpec, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device):
        self.mask = torch.zeros((batch_size, max_length), dtype=torch.bool, device=device)
        self.real_count = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.batch_size, self.max_length = batch_size, max_length
        self.length = 0         # slots written
        self.padded = False     # some slot so far is padding
        self._allocate(spec, (batch_size, spec.num_kv_heads, max_length, spec.head_dim), dtype, device)

    def _allocate(self, spec: ModelSpec, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        # empty, not zeros: slots are only ever read after they are written
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]

    @staticmethod
    def nbytes(spec: ModelSpec, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
        """What a cache of these sizes allocates, computed without allocating it."""
        return decoder_cache_bytes(spec, batch_size, max_length, dtype)

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Check that the new tokens fit and record them (real or padding); their positions [B, T]."""
        batch, length = input_ids.shape
        if self.length + length > self.max_length or batch != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} x {self.max_length} slots; "
                             f"{batch} x {length} tokens do not fit after {self.length}")
        return record_tokens(self, attention_mask, length, input_ids.device)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys/values at the current slots; all keys/values so far, as views."""
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class QuantizedDecoderCache(DecoderCache):
    """Keys and values of every layer as kv_quant codes [2, B, kv_heads, max_length, codes_width] and
    group constants [2, B, kv_heads, max_length, groups, params_width] (index 0: keys, 1: values; one
    tensor for both, so that a step quantizes and dequantizes them in one call each)."""

    def __init__(self, spec: ModelSpec, batch_size: int, max_length: int, dtype: torch.dtype,
                 device: torch.device, scheme: str):
        self.scheme, self.dtype = scheme, dtype
        super().__init__(spec, batch_size, max_length, dtype, device)

    def _allocate(self, spec: ModelSpec, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        *lead, head_dim = shape
        codes = (*lead, kv_quant.codes_width(self.scheme, head_dim))
        params = (*lead, head_dim // kv_quant.group_size(head_dim), kv_quant.params_width(self.scheme))
        code_dtype = torch.int8 if self.scheme == "int8" else torch.uint8
        self.codes = [torch.empty((2, *codes), dtype=code_dtype, device=device) for _ in range(spec.num_layers)]
        self.params = [torch.empty((2, *params), dtype=torch.float32, device=device) for _ in range(spec.num_layers)]
        # What attention reads: one layer's keys and values dequantized, reused by every layer (a layer's
        # attention is done before the next layer writes), and int4's unpacked codes.
        self.workspace = torch.empty((2, *shape), dtype=dtype, device=device)
        self.scratch = torch.empty((2, *codes, 2), dtype=torch.uint8, device=device) if self.scheme == "int4" else None

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the new tokens' keys/values into the current slots; all keys/values so far,
        dequantized (a temporary in the model's dtype, of the slots in use only)."""
        end = self.length + keys.shape[2]
        codes, params = kv_quant.quantize_kv(torch.stack((keys, values)), self.scheme)
        self.codes[layer][:, :, :, self.length:end] = codes
        self.params[layer][:, :, :, self.length:end] = params
        scratch = self.scratch[:, :, :, :end] if self.scratch is not None else None
        both = kv_quant.dequantize_kv(self.codes[layer][:, :, :, :end], self.params[layer][:, :, :, :end],
                                      self.scheme, self.dtype, self.workspace[:, :, :, :end], scratch)
        return both[0], both[1]


def new_decoder_cache(spec: ModelSpec, batch_size: int, max_length: int, dtype: torch.dtype,
                      device: torch.device, scheme: str | None = None) -> DecoderCache:
    if scheme is None:
        return DecoderCache(spec, batch_size, max_length, dtype, device)
    return QuantizedDecoderCache(spec, batch_size, max_length, dtype, device, scheme)


def decoder_cache_bytes(spec: ModelSpec, batch_size: int, max_length: int, dtype: torch.dtype,
                        scheme: str | None = None) -> int:
    """What new_decoder_cache allocates, from the spec alone: keys and values of every layer, the
    mask of real slots and the per-row token counts; quantized, also one layer's keys and values in
    `dtype` (the workspace attention reads) and, for int4, one layer's unpacked codes."""
    vectors = 2 * batch_size * spec.num_kv_heads * max_length
    total = batch_size * (max_length + 8)
    if scheme is None:
        return total + spec.num_layers * vectors * spec.head_dim * dtype.itemsize
    total += spec.num_layers * vectors * kv_quant.bytes_per_vector(scheme, spec.head_dim)
    total += vectors * spec.head_dim * dtype.itemsize
    return total + (vectors * spec.head_dim if scheme == "int4" else 0)


def record_tokens(cache: DecoderCache, attention_mask: torch.Tensor | None, length: int,
                  device: torch.device) -> torch.Tensor:
    """Mark the next `length` slots real or padding in `cache`; the new tokens' positions [B, T]."""
    start, end = cache.length, cache.length + length
    if attention_mask is None:
        positions = cache.real_count[:, None] + torch.arange(length, device=device)
        cache.mask[:, start:end] = True
        cache.real_count += length
        return positions
    real = attention_mask.to(device=device, dtype=torch.bool)
    positions = (cache.real_count[:, None] + real.cumsum(dim=1) - 1).masked_fill_(~real, 0)
    cache.mask[:, start:end] = real
    cache.real_count += real.sum(dim=1)
    if not cache.padded:
        cache.padded = not bool(real.all())
    return positions
