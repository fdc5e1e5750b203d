"""The running batch: sequences join at the next step and leave the step they finish.

A step has a token budget (`step_tokens`, as vLLM's max_num_batched_tokens): first one decode token
for every sequence past its prompt, then what is left goes to the prompts of newcomers, in arrival
order, a chunk of each (chunked prefill). A long prompt therefore costs the running sequences a
bounded delay per step instead of one long stall; its first token comes from the step that consumes
its last chunk. `step_tokens=None` prefills each newcomer's whole prompt in the step it joins.

Two ways to run it:
- `RecurrentSlots` (HGRN-Bit): one recurrent state per slot in a preallocated [layers, slots, width]
  tensor. A prompt chunk runs from a copy of its slot's state and is written back (the state carries
  from chunk to chunk, as in the model's own sliced prefill), the chunks of a step's newcomers in
  one staircase of forwards (serve.scheduled.staircase); each decode step gathers the decoding
  slots' states, runs them as one batch through the model's forward (the fused C step on CPU), and
  writes them back. Rows never see one another, so a sequence's tokens are those it makes alone.
- `PagedDecoders` (serve/paged_batch.py, the decoder family held in memory): a paged KV cache; each
  step's decodes run as one batch.
- `Interleaved` (offloaded decoders, BitNet): each sequence has its own cache; its prompt is fed in
  chunks and its decode steps run one sequence at a time. Sequences still join and leave between
  steps.
"""
from __future__ import annotations

import torch

from memwise.kernels import greedy_tokens
from memwise.language_model import LanguageModel
from memwise.memory_gate import check_fits
from memwise.models.decoder.modules import Decoder
from memwise.serve.paged_batch import PagedDecoders
from memwise.serve.scheduled import Scheduled, staircase
from memwise.serve.sequence import Sequence


class RecurrentSlots(Scheduled):
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

    def _prefill_chunks(self, chunks: list[tuple[Sequence, list[int]]]) -> list[torch.Tensor]:
        """Newcomers' chunks of a step in as few forwards as their lengths allow (`staircase`): rows
        never see one another and every operation but the recurrence works token by token, so a
        row's logits and state are those of its chunk fed alone, for one pass over the weights
        (measured: 4 chunks of 28 tokens of mmfree-370m took 1.3x as long one by one as together)."""
        together, bounds = staircase([len(ids) for _, ids in chunks])
        logits: list[torch.Tensor | None] = [None] * len(chunks)
        if len(together) > 1:
            slots = [self.slot_of[id(chunks[k][0])] for k in together]
            state = self.cache.state.index_select(1, torch.tensor(slots, device=self.model.device))
            start = 0
            for end in bounds:
                rows = [k for k in together if len(chunks[k][1]) >= end]    # a prefix of `together`
                ids = torch.tensor([chunks[k][1][start:end] for k in rows], dtype=torch.long,
                                   device=self.model.device)
                # The first rows' states, contiguous as a chunk fed alone has them (a long forward's
                # last slice of one token takes the fused step only then); written back after.
                own = type(self.cache)(state[:, :len(rows)].contiguous())
                out = self.module(ids, own, torch.ones_like(ids, dtype=torch.bool), last_only=True)[:, -1].float()
                state[:, :len(rows)] = own.state
                for b, k in enumerate(rows):
                    if len(chunks[k][1]) == end:
                        logits[k] = out[b:b + 1]
                start = end
            for b, slot in enumerate(slots):
                self.cache.state[:, slot].copy_(state[:, b])
        for k, (seq, ids) in enumerate(chunks):
            if logits[k] is None:
                logits[k] = self._prefill(seq, torch.tensor([ids], dtype=torch.long, device=self.model.device))
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


class Interleaved(Scheduled):
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


def running_batch(model: LanguageModel, capacity: int,
                  step_tokens: int | None = None) -> RecurrentSlots | PagedDecoders | Interleaved:
    """Slots of recurrent state for HGRN-Bit, a paged KV cache for the decoder family held in memory,
    one cache per sequence otherwise (offloaded decoders, BitNet)."""
    if model.spec.model_type == "hgrn_bit":
        return RecurrentSlots(model, capacity, step_tokens)
    if isinstance(model.module, Decoder) and model.module.layer_stream is None:
        return PagedDecoders(model, capacity, step_tokens)
    return Interleaved(model, capacity, step_tokens)
