"""The running batch of a decoder-family model over a paged KV cache (models/decoder/paged.py).

Each sequence owns a table of blocks from one pool. A step runs one decode token for every decoding
sequence as one batch (one forward, rows left-padded to the longest), then newcomers' prompt chunks
within the step's token budget (serve/scheduled.py), each into its own blocks. Admission reserves the blocks a sequence can ever need (prompt + max_tokens) and hands
them out as it grows, so a running sequence never finds the pool empty; a newcomer whose blocks
are not free yet waits, in arrival order, until finished sequences return theirs.
"""
from __future__ import annotations

import torch

from memwise.kernels import greedy_tokens
from memwise.language_model import LanguageModel
from memwise.models.decoder.paged import BlockPool, PagedView
from memwise.serve.scheduled import Scheduled
from memwise.serve.sequence import Sequence

# Tokens per block: vLLM's default. Smaller blocks waste less of a sequence's last block; larger ones
# make the per-step gather of block rows coarser. 16 x (2 x layers x kv_heads x head_dim) numbers.
BLOCK_SIZE = 16
# The pool holds this many tokens per slot on average when not told otherwise: a bound on the KV
# cache's memory (gpt2-medium float32, 16 slots: 1.5 GiB), reached only when every slot is that long.
DEFAULT_TOKENS_PER_SLOT = 512


class PagedDecoders(Scheduled):
    def __init__(self, model: LanguageModel, capacity: int, step_tokens: int | None = None,
                 num_blocks: int | None = None, block_size: int = BLOCK_SIZE):
        super().__init__(model, capacity, step_tokens)
        spec = model.spec
        if num_blocks is None:
            per_slot = -(-min(spec.max_positions, DEFAULT_TOKENS_PER_SLOT) // block_size)
            num_blocks = capacity * per_slot + 1
        self.pool = BlockPool(spec, num_blocks, block_size, self.module.dtype, self.module.device,
                              self.module.kv_cache)
        self.tables: dict[int, list[int]] = {}   # id(sequence) -> its blocks
        self.lengths: dict[int, int] = {}        # id(sequence) -> tokens in its blocks
        self.reserved: dict[int, int] = {}       # id(sequence) -> blocks it may still take
        self.waiting: list[Sequence] = []        # admitted, their blocks not free yet: not running

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.running) - len(self.waiting)

    @property
    def free_blocks(self) -> int:
        return self.pool.free_blocks

    def add(self, seq: Sequence) -> None:
        """Take `seq` in: its prompt is fed by the following steps once its blocks are free."""
        need = self._need(seq)
        if need > self.pool.usable_blocks:
            seq.end("error", f"the request needs {need} KV blocks of {self.pool.block_size} tokens; the pool "
                             f"has {self.pool.usable_blocks}")
            return
        self.waiting.append(seq)
        self._start_waiting()

    def step(self) -> None:
        self._start_waiting()
        super().step()

    def _need(self, seq: Sequence) -> int:
        return self.pool.blocks_for(len(seq.prompt_ids) + seq.sampling.max_tokens)

    def _start_waiting(self) -> None:
        """Move waiting sequences whose blocks are free into the batch, first come first served; a
        cancelled one joins at once (nothing reserved), for the engine to remove and count."""
        blocked = False
        for seq in list(self.waiting):
            if not seq.cancelled:
                need = self._need(seq)
                if blocked or self.pool.free_blocks - sum(self.reserved.values()) < need:
                    blocked = True
                    continue
                self.tables[id(seq)], self.lengths[id(seq)], self.reserved[id(seq)] = [], 0, need
            self.waiting.remove(seq)
            self.running.append(seq)
            self.consumed[id(seq)] = 0

    def _prefill(self, seq: Sequence, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        self._grow(seq, n)
        view = PagedView(self.pool, [self.tables[id(seq)]], [self.lengths[id(seq)]], n)
        logits = self.module(ids, view, None, last_only=True)[:, -1].float()
        self.lengths[id(seq)] += n
        return logits

    def _decode(self, rows: list[Sequence]) -> None:
        """One decode step for every row, as one batch over their blocks."""
        for seq in rows:
            self._grow(seq, 1)
        view = PagedView(self.pool, [self.tables[id(s)] for s in rows], [self.lengths[id(s)] for s in rows], 1)
        last = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.model.device)
        logits = self.module(last, view, None, last_only=True)[:, -1].float()
        greedy = greedy_tokens(logits).tolist()
        for b, seq in enumerate(rows):
            self.lengths[id(seq)] += 1
            self._take(seq, logits[b:b + 1], greedy[b])

    def remove(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        super().remove(seq)

    def _release(self, seq: Sequence) -> None:
        table = self.tables.pop(id(seq), None)
        if table is not None:
            self.pool.release(table)
            self.lengths.pop(id(seq))
            self.reserved.pop(id(seq))

    def _grow(self, seq: Sequence, tokens: int) -> None:
        """Give `seq` the blocks its next `tokens` tokens need, from its reservation."""
        table = self.tables[id(seq)]
        while len(table) < self.pool.blocks_for(self.lengths[id(seq)] + tokens):
            table.append(self.pool.allocate())
            self.reserved[id(seq)] -= 1
