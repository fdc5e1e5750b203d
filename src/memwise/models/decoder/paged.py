"""A paged KV cache for the decoder family: fixed-size blocks from one pool, as vLLM keeps them.

The server runs many sequences of different lengths that come and go. A contiguous cache per slot
must reserve the longest possible sequence for every slot; a pool of blocks of `block_size` tokens
gives each sequence only the blocks it fills, and a finished sequence's blocks go back on the free
list for the next one. Memory is bounded by the pool, and reused.

Layout. Each layer holds keys and values as one tensor [num_blocks * block_size, kv_heads,
head_dim] (float) or, with a quantized KV scheme, kv_quant codes and group constants per token
row; block b owns rows [b * block_size, (b + 1) * block_size). Block 0 is never handed out: it stays
zero, and the padding slots of a batch read it, so that masked slots hold finite numbers (a NaN
times a zero attention weight would still be NaN).

`PagedView` is what `Decoder.forward` sees for one call: it behaves as a left-padded `DecoderCache`
of the rows given (row b's tokens occupy the last slots), writing the new keys and values into the
rows' blocks and gathering every row's keys and values so far, in order, for attention. The gather
copies the cache once per layer and step; attention over the blocks in place would need its own
kernel.
"""
from __future__ import annotations

import math

import torch

from memwise.errors import MemwiseError
from memwise.kernels import kv_quant
from memwise.models.decoder.cache import record_tokens
from memwise.spec import ModelSpec

__all__ = ["BlockPool", "BlockPoolExhausted", "PagedView"]


class BlockPoolExhausted(MemwiseError):
    """No free block is left in the pool."""


class BlockPool:
    """Keys and values of `num_blocks` blocks of `block_size` tokens for every layer, and the free list."""

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, scheme: str | None = None):
        if num_blocks < 2 or block_size < 1:
            raise MemwiseError(f"a block pool needs at least 2 blocks of at least 1 token; got {num_blocks} "
                               f"blocks of {block_size}")
        self.spec, self.dtype, self.device, self.scheme = spec, dtype, device, scheme
        self.num_blocks, self.block_size = num_blocks, block_size
        rows = num_blocks * block_size
        heads, head_dim = spec.num_kv_heads, spec.head_dim
        # empty, not zeros: a block's rows are read only after they are written, so the pool's pages
        # become resident as sequences first fill them; block 0 alone is zeroed, for padding to read
        if scheme is None:
            self.keys = [torch.empty((rows, heads, head_dim), dtype=dtype, device=device) for _ in range(spec.num_layers)]
            self.values = [torch.empty((rows, heads, head_dim), dtype=dtype, device=device) for _ in range(spec.num_layers)]
            for t in (*self.keys, *self.values):
                t[:block_size].zero_()
        else:
            code_dtype = torch.int8 if scheme == "int8" else torch.uint8
            width = kv_quant.codes_width(scheme, head_dim)
            groups = head_dim // kv_quant.group_size(head_dim)
            self.codes = [torch.empty((2, rows, heads, width), dtype=code_dtype, device=device)
                          for _ in range(spec.num_layers)]
            self.params = [torch.empty((2, rows, heads, groups, kv_quant.params_width(scheme)), dtype=torch.float32,
                                       device=device) for _ in range(spec.num_layers)]
            for t in (*self.codes, *self.params):
                t[:, :block_size].zero_()
        # Last freed, first reused: a block that was just written is the likeliest to be resident.
        self._free = list(range(num_blocks - 1, 0, -1))

    @staticmethod
    def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype, scheme: str | None = None) -> int:
        """Bytes one block takes across all layers, keys and values."""
        per_vector = (spec.head_dim * dtype.itemsize if scheme is None
                      else kv_quant.bytes_per_vector(scheme, spec.head_dim))
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * per_vector

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def allocate(self) -> int:
        if not self._free:
            raise BlockPoolExhausted(f"the KV block pool is exhausted ({self.usable_blocks} blocks of "
                                     f"{self.block_size} tokens in use)")
        return self._free.pop()

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            if not 0 < block < self.num_blocks or block in self._free:
                raise MemwiseError(f"block {block} is not an allocated block of this pool")
        self._free.extend(reversed(blocks))

    def token_rows(self, table: list[int], start: int, end: int) -> list[int]:
        """Pool rows of tokens [start, end) of a sequence whose blocks are `table`."""
        size = self.block_size
        return [table[t // size] * size + t % size for t in range(start, end)]


class PagedView:
    """One forward call's cache: rows with block tables `tables` and `lengths` tokens so far, each
    given `new` tokens now. Left-padded like DecoderCache: row b's slots are the last lengths[b] + new."""

    def __init__(self, pool: BlockPool, tables: list[list[int]], lengths: list[int], new: int):
        for table, length in zip(tables, lengths):
            if pool.blocks_for(length + new) > len(table):
                raise MemwiseError(f"a sequence of {length} + {new} tokens needs {pool.blocks_for(length + new)} "
                                   f"blocks; its table has {len(table)}")
        self.pool, self.new = pool, new
        device = pool.device
        batch, slots = len(tables), max(lengths) + new
        self.batch_size, self.max_length = batch, slots
        self.length = slots - new
        self.padded = len(set(lengths)) > 1
        self.mask = torch.zeros((batch, slots), dtype=torch.bool, device=device)
        reads = torch.zeros((batch, slots), dtype=torch.long, device=device)   # padding reads block 0
        writes = []
        for b, (table, length) in enumerate(zip(tables, lengths)):
            first = slots - new - length
            self.mask[b, first:slots - new] = True
            reads[b, first:] = torch.tensor(pool.token_rows(table, 0, length + new), dtype=torch.long)
            writes.extend(pool.token_rows(table, length, length + new))
        self.real_count = torch.tensor(lengths, dtype=torch.long, device=device)
        self._reads = reads.flatten()
        self._writes = torch.tensor(writes, dtype=torch.long, device=device)

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length = input_ids.shape
        if batch != self.batch_size or length != self.new or attention_mask is not None:
            raise ValueError(f"this paged view takes {self.batch_size} x {self.new} unpadded tokens, "
                             f"not {batch} x {length}")
        return record_tokens(self, None, length, input_ids.device)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys/values [B, H, new, D] into their blocks; every row's keys and
        values so far [B, H, slots, D], gathered from the blocks."""
        pool = self.pool
        batch, heads, _, head_dim = keys.shape
        new_k = keys.transpose(1, 2).reshape(-1, heads, head_dim)
        new_v = values.transpose(1, 2).reshape(-1, heads, head_dim)
        if pool.scheme is None:
            pool.keys[layer].index_copy_(0, self._writes, new_k.to(pool.dtype))
            pool.values[layer].index_copy_(0, self._writes, new_v.to(pool.dtype))
            k = pool.keys[layer].index_select(0, self._reads)
            v = pool.values[layer].index_select(0, self._reads)
        else:
            codes, params = kv_quant.quantize_kv(torch.stack((new_k, new_v)), pool.scheme)
            pool.codes[layer].index_copy_(1, self._writes, codes)
            pool.params[layer].index_copy_(1, self._writes, params)
            both = kv_quant.dequantize_kv(pool.codes[layer].index_select(1, self._reads),
                                          pool.params[layer].index_select(1, self._reads), pool.scheme, pool.dtype)
            k, v = both[0], both[1]
        shape = (batch, self.max_length, heads, head_dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
