"""The running batch: sequences join at the next step and leave the step they finish.

A step has a token budget (`step_tokens`, as vLLM's max_num_batched_tokens): first one decode token
for every sequence past its prompt, then what is left goes to the prompts of newcomers, in arrival
order, a chunk of each (chunked prefill). A long prompt therefore costs the running sequences a
bounded delay per step instead of one long stall; its first token comes from the step that consumes
its last chunk. `step_tokens=None` prefills each newcomer's whole prompt in the step it joins.

Two ways to run it:
- `RecurrentSlots` (HGRN-Bit): one recurrent state per slot in a preallocated [layers, slots, width]
  tensor. A prompt chunk runs from a copy of its slot's state and is written back (the state carries
  from chunk to chunk, as in the model's own sliced prefill); each decode step gathers the decoding
  slots' states, runs them as one batch through the model's forward (the fused C step on CPU), and
  writes them back. Rows never see one another, so a sequence's tokens are those it makes alone.
- `Interleaved` (any other family): each sequence has its own cache; its prompt is fed in chunks and
  its decode steps run one sequence at a time (a batched decoder step needs a paged KV cache; see
  docs/serve.md). Sequences still join and leave between steps.
"""
from __future__ import annotations

import torch

from memwise.kernels import greedy_tokens
from memwise.language_model import LanguageModel
from memwise.memory_gate import check_fits
from memwise.serve.sequence import Sequence


def chunk_plan(remaining: list[int], budget: int | None) -> list[int]:
    """Prompt tokens to feed this step for each waiting prompt (`remaining` of each, in arrival order)
    out of `budget` tokens (None: all of them).

    Prefill always advances (at least 2 tokens when the decodes took the whole budget), and no chunk
    is a lone token unless the prompt is one token: a one-token forward takes the fused decode path,
    whose float order differs from the many-token path, so greedy tokens could differ from an
    unchunked prefill's. That may overrun the budget by a token or two."""
    if budget is None:
        return list(remaining)
    left = max(budget, 2)
    plan = []
    for r in remaining:
        n = min(r, max(left, 2)) if left > 0 else 0
        if n and r - n == 1:
            n = r
        plan.append(n)
        left -= n
    return plan


class _Scheduled:
    """What both batches share: the running sequences (prefilling or decoding), prompt progress, and
    the order of a step (decodes first, then prompt chunks within the budget)."""

    def __init__(self, model: LanguageModel, capacity: int, step_tokens: int | None):
        self.model = model
        self.module = model.module
        self.capacity = capacity
        self.step_tokens = step_tokens
        self.running: list[Sequence] = []
        self.consumed: dict[int, int] = {}       # id(sequence) -> prompt tokens fed so far, while prefilling

    @property
    def prefilling(self) -> list[Sequence]:
        return [s for s in self.running if id(s) in self.consumed]

    def step(self) -> None:
        """One decode token for each decoding sequence, then prompt chunks of newcomers in the budget left."""
        decoding = [s for s in self.running if id(s) not in self.consumed and not s.done]
        if decoding:
            self._decode(decoding)
        waiting = [s for s in self.prefilling if not s.cancelled]
        if not waiting:
            return
        budget = None if self.step_tokens is None else self.step_tokens - len(decoding)
        plan = chunk_plan([len(s.prompt_ids) - self.consumed[id(s)] for s in waiting], budget)
        for seq, n in zip(waiting, plan):
            if n == 0:
                break
            start = self.consumed[id(seq)]
            ids = torch.tensor([seq.prompt_ids[start:start + n]], dtype=torch.long, device=self.model.device)
            logits = self._prefill(seq, ids)
            self.consumed[id(seq)] = start + n
            if start + n == len(seq.prompt_ids):
                del self.consumed[id(seq)]
                self._take(seq, logits)

    def _take(self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        if not seq.cancelled:
            seq.accept(greedy if greedy is not None and seq.sampling.greedy else seq.sample(logits))
        if seq.done:     # a cancelled one is the engine's to remove (it counts it)
            self.remove(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.consumed.pop(id(seq), None)
            self._release(seq)

    def _decode(self, rows: list[Sequence]) -> None:
        raise NotImplementedError

    def _prefill(self, seq: Sequence, ids: torch.Tensor) -> torch.Tensor:
        """Feed one chunk of `seq`'s prompt; the float32 logits [1, V] after its last token."""
        raise NotImplementedError

    def _release(self, seq: Sequence) -> None:
        raise NotImplementedError


class RecurrentSlots(_Scheduled):
    def __init__(self, model: LanguageModel, capacity: int, step_tokens: int | None = None):
        super().__init__(model, capacity, step_tokens)
        self.cache = self.module.new_cache(capacity)
        self.slot_of: dict[int, int] = {}           # id(sequence) -> slot
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(self, seq: Sequence) -> None:
        """Give `seq` a free slot with a zero state; its prompt is fed by the following steps."""
        slot = self._free.pop()
        self.slot_of[id(seq)] = slot
        self.cache.state[:, slot].zero_()
        self.running.append(seq)
        self.consumed[id(seq)] = 0

    def _prefill(self, seq: Sequence, ids: torch.Tensor) -> torch.Tensor:
        slot = self.slot_of[id(seq)]
        own = type(self.cache)(self.cache.state[:, slot:slot + 1].clone())
        logits = self.module(ids, own, torch.ones_like(ids, dtype=torch.bool), last_only=True)[:, -1].float()
        self.cache.state[:, slot] = own.state[:, 0]
        return logits

    def _decode(self, rows: list[Sequence]) -> None:
        numbers = [self.slot_of[id(s)] for s in rows]
        slots = torch.tensor(numbers, device=self.model.device)
        cache = type(self.cache)(self.cache.state.index_select(1, slots))
        last = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.model.device)
        logits = self.module(last, cache, torch.ones_like(last, dtype=torch.bool), last_only=True)[:, -1].float()
        # One copy per slot: index_copy_ along dim 1 takes a slow path on CPU (a sixth of a batch-16
        # step of mmfree-370m); these copies take well under a millisecond.
        for b, slot in enumerate(numbers):
            self.cache.state[:, slot].copy_(cache.state[:, b])
        greedy = greedy_tokens(logits).tolist()      # one call for the batch: the common case
        for b, seq in enumerate(rows):
            self._take(seq, logits[b:b + 1], greedy[b])

    def _release(self, seq: Sequence) -> None:
        self._free.append(self.slot_of.pop(id(seq)))


class Interleaved(_Scheduled):
    def __init__(self, model: LanguageModel, capacity: int, step_tokens: int | None = None):
        super().__init__(model, capacity, step_tokens)
        self._caches: dict[int, object] = {}        # id(sequence) -> its own cache

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.running)

    def add(self, seq: Sequence) -> None:
        """Allocate `seq`'s cache for its prompt and max_tokens (refused, alone, if memory is short)."""
        total = len(seq.prompt_ids) + seq.sampling.max_tokens
        check_fits(f"a cache for {len(seq.prompt_ids)} prompt + {seq.sampling.max_tokens} new tokens",
                   {"cache": self.module.cache_bytes(1, total)}, self.model.device)
        self._caches[id(seq)] = self.module.new_cache(1, total)
        self.running.append(seq)
        self.consumed[id(seq)] = 0

    def _prefill(self, seq: Sequence, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(seq, ids)

    def _decode(self, rows: list[Sequence]) -> None:
        for seq in rows:
            last = torch.tensor([[seq.generated[-1]]], dtype=torch.long, device=self.model.device)
            self._take(seq, self._forward(seq, last))

    def _forward(self, seq: Sequence, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids, dtype=torch.bool)
        return self.module(ids, self._caches[id(seq)], mask, last_only=True)[:, -1].float()

    def _release(self, seq: Sequence) -> None:
        self._caches.pop(id(seq), None)


def running_batch(model: LanguageModel, capacity: int, step_tokens: int | None = None) -> RecurrentSlots | Interleaved:
    """Slots of recurrent state for HGRN-Bit, one cache per sequence otherwise."""
    if model.spec.model_type == "hgrn_bit":
        return RecurrentSlots(model, capacity, step_tokens)
    return Interleaved(model, capacity, step_tokens)
