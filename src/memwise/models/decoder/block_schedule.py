"""FlexGen's block schedule for the decoder: a batch split into micro-batches, and each layer, once its
weights are in memory, run for every micro-batch before the next layer.

An offloaded model streams its layers from disk (memwise.offload); run row by row, every micro-batch
would read every layer again. Run layer by layer, one read serves the whole batch, while the batch's
activations are what the working set holds per micro-batch (a micro-batch's activations and its own
KV cache), so the batch can be larger than what one forward pass over all rows would hold at once.

Each micro-batch has its own cache (the rows a plain forward would give it, so its logits are, bit
for bit, those of a forward pass over those rows alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def micro_batch_rows(batch_size: int, micro_batch_size: int) -> list[int]:
    """Row counts of the micro-batches of `batch_size` rows: full ones of `micro_batch_size`, then the rest."""
    full, rest = divmod(batch_size, micro_batch_size)
    return [micro_batch_size] * full + ([rest] if rest else [])


@dataclass
class MicroBatchCache:
    """One decoder cache per micro-batch, in row order."""
    parts: list

    @property
    def rows(self) -> list[int]:
        return [part.batch_size for part in self.parts]

    @property
    def batch_size(self) -> int:
        return sum(self.rows)

    @property
    def max_length(self) -> int:
        return self.parts[0].max_length

    @property
    def length(self) -> int:
        return self.parts[0].length


def block_forward(model, input_ids: torch.Tensor, cache: MicroBatchCache, attention_mask: torch.Tensor | None,
                  last_only: bool) -> torch.Tensor:
    """Decoder.forward over the micro-batches of `cache`, layer-major: float32 logits [B, T or 1, V]."""
    if input_ids.shape[0] != cache.batch_size:
        raise ValueError(f"cache holds {cache.batch_size} rows in micro-batches of {cache.rows}; "
                         f"{input_ids.shape[0]} rows given")
    rows = cache.rows
    masks = attention_mask.split(rows) if attention_mask is not None else [None] * len(rows)
    states = [list(model.enter(ids, part, mask)) for ids, part, mask in zip(input_ids.split(rows), cache.parts, masks)]
    layers = model.layers if model.layer_stream is None else model.layer_stream.layers(model.layers)
    for layer in layers:
        for state, part in zip(states, cache.parts):
            state[0] = layer(state[0], state[1], part, state[2], state[3])
    for part in cache.parts:
        part.length += input_ids.shape[1]
    return torch.cat([model.head(state[0], last_only) for state in states])
