"""The running batch of a decoder-family model over a paged KV cache (models/decoder/paged.py).

Each sequence owns a table of blocks from one pool. A newcomer is prefilled alone into its blocks;
each decode step runs every prefilled sequence as one batch (one forward, rows left-padded to the
longest). Admission reserves the blocks a sequence can ever need (prompt + max_tokens) and hands
them out as it grows, so a running sequence never finds the pool empty; a newcomer whose blocks
are not free yet waits, in arrival order, until finished sequences return theirs.
"""
from __future__ import annotations

import torch

from memwise.kernels import greedy_tokens
from memwise.language_model import LanguageModel
from memwise.models.decoder.paged import BlockPool, PagedView
from memwise.serve.sequence import Sequence

# Tokens per block: vLLM's default. Smaller blocks waste less of a sequence's last block; larger ones
# make the per-step gather of block rows coarser. 16 x (2 x layers x kv_heads x head_dim) numbers.
BLOCK_SIZE = 16
# The pool holds this many tokens per slot on average when not told otherwise: a bound on the KV
# cache's memory (gpt2-medium float32, 16 slots: 1.5 GiB), reached only when every slot is that long.
DEFAULT_TOKENS_PER_SLOT = 512


class PagedDecoders:
    def __init__(self, model: LanguageModel, capacity: int, num_blocks: int | None = None,
                 block_size: int = BLOCK_SIZE):
        self.model = model
        self.module = model.module
        self.capacity = capacity
        spec = model.spec
        if num_blocks is None:
            per_slot = -(-min(spec.max_positions, DEFAULT_TOKENS_PER_SLOT) // block_size)
            num_blocks = capacity * per_slot + 1
        self.pool = BlockPool(spec, num_blocks, block_size, self.module.dtype, self.module.device,
                              self.module.kv_cache)
        self.running: list[Sequence] = []        # prefilled or waiting for blocks, in arrival order
        self.tables: dict[int, list[int]] = {}   # id(sequence) -> its blocks
        self.lengths: dict[int, int] = {}        # id(sequence) -> tokens in its blocks
        self.reserved: dict[int, int] = {}       # id(sequence) -> blocks it may still take
        self.waiting: list[Sequence] = []        # admitted, not yet prefilled: their blocks are not free

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.running)

    @property
    def free_blocks(self) -> int:
        return self.pool.free_blocks

    def add(self, seq: Sequence) -> None:
        """Take `seq` into the batch: prefill it now if its blocks are free, else when they are."""
        need = self.pool.blocks_for(len(seq.prompt_ids) + seq.sampling.max_tokens)
        if need > self.pool.usable_blocks:
            seq.end("error", f"the request needs {need} KV blocks of {self.pool.block_size} tokens; the pool "
                             f"has {self.pool.usable_blocks}")
            return
        self.running.append(seq)
        self.waiting.append(seq)
        self._prefill_waiting()

    def step(self) -> None:
        """Prefill newcomers whose blocks are free, then one decode step for every prefilled sequence."""
        self._prefill_waiting()
        rows = [s for s in self.running if id(s) in self.tables and not s.done]
        if not rows:
            return
        for seq in rows:
            self._grow(seq, 1)
        tables = [self.tables[id(s)] for s in rows]
        lengths = [self.lengths[id(s)] for s in rows]
        view = PagedView(self.pool, tables, lengths, 1)
        last = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            logits = self.module(last, view, None, last_only=True)[:, -1].float()
        greedy = greedy_tokens(logits).tolist()
        for b, seq in enumerate(rows):
            self.lengths[id(seq)] += 1
            self._take(seq, logits[b:b + 1], greedy[b])

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        table = self.tables.pop(id(seq), None)
        if table is not None:
            self.pool.release(table)
            self.lengths.pop(id(seq))
            self.reserved.pop(id(seq))

    def _outstanding(self) -> int:
        """Blocks promised to running sequences and not yet taken from the free list."""
        return sum(self.reserved.values())

    def _prefill_waiting(self) -> None:
        while self.waiting:
            seq = self.waiting[0]
            need = self.pool.blocks_for(len(seq.prompt_ids) + seq.sampling.max_tokens)
            if self.pool.free_blocks - self._outstanding() < need:
                return    # first come, first served: later arrivals wait behind it
            self.waiting.pop(0)
            if seq.cancelled:
                continue   # the engine removes and counts it
            self.tables[id(seq)], self.lengths[id(seq)], self.reserved[id(seq)] = [], 0, need
            self._grow(seq, len(seq.prompt_ids))
            ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.model.device)
            view = PagedView(self.pool, [self.tables[id(seq)]], [0], len(seq.prompt_ids))
            with torch.inference_mode():
                logits = self.module(ids, view, None, last_only=True)[:, -1].float()
            self.lengths[id(seq)] = len(seq.prompt_ids)
            self._take(seq, logits)

    def _grow(self, seq: Sequence, tokens: int) -> None:
        """Give `seq` the blocks its next `tokens` tokens need, from its reservation."""
        table = self.tables[id(seq)]
        while len(table) < self.pool.blocks_for(self.lengths[id(seq)] + tokens):
            table.append(self.pool.allocate())
            self.reserved[id(seq)] -= 1

    def _take(self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        if not seq.cancelled:
            seq.accept(greedy if greedy is not None and seq.sampling.greedy else seq.sample(logits))
        if seq.done:     # a cancelled one is the engine's to remove (it counts it)
            self.remove(seq)
