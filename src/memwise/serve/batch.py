"""The running batch: sequences join at the next step and leave the step they finish.

Two ways to run it:
- `RecurrentSlots` (HGRN-Bit): one recurrent state per slot in a preallocated [layers, slots, width]
  tensor. A newcomer is prefilled alone into a fresh state that is then copied into its slot; each
  decode step gathers the running slots' states, runs them as one batch through the model's forward
  (the fused C step on CPU), and writes them back. Rows never see one another, so a sequence's
  tokens are those it makes alone.
- `PagedDecoders` (serve/paged_batch.py, the decoder family held in memory): a paged KV cache, one
  batched decode step for all running sequences.
- `Interleaved` (offloaded decoders, BitNet): each sequence is its own `LanguageModel.stream`
  generator, and a step advances each once. Sequences still join and leave between steps, but the
  model runs one sequence at a time.
"""
from __future__ import annotations

from typing import Iterator

import torch

from memwise.kernels import greedy_tokens
from memwise.language_model import LanguageModel
from memwise.models.decoder.modules import Decoder
from memwise.serve.paged_batch import PagedDecoders
from memwise.serve.sequence import Sequence


class RecurrentSlots:
    def __init__(self, model: LanguageModel, capacity: int):
        self.model = model
        self.capacity = capacity
        self.module = model.module
        self.cache = self.module.new_cache(capacity)
        self.slot_of: dict[int, int] = {}           # id(sequence) -> slot
        self.running: list[Sequence] = []
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(self, seq: Sequence) -> None:
        """Prefill `seq` into a free slot and take its first token."""
        slot = self._free.pop()
        self.slot_of[id(seq)] = slot
        self.running.append(seq)
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.model.device)
        fresh = self.module.new_cache(1)
        with torch.inference_mode():
            logits = self.module(ids, fresh, torch.ones_like(ids, dtype=torch.bool), last_only=True)[:, -1].float()
        self.cache.state[:, slot] = fresh.state[:, 0]
        self._take(seq, logits)

    def step(self) -> None:
        """One decode step for every running sequence, as one batch."""
        if not self.running:
            return
        rows = list(self.running)
        slots = torch.tensor([self.slot_of[id(s)] for s in rows], device=self.model.device)
        cache = type(self.cache)(self.cache.state.index_select(1, slots))
        last = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            logits = self.module(last, cache, torch.ones_like(last, dtype=torch.bool), last_only=True)[:, -1].float()
        self.cache.state.index_copy_(1, slots, cache.state)
        greedy = greedy_tokens(logits).tolist()      # one call for the batch: the common case
        for b, seq in enumerate(rows):
            self._take(seq, logits[b:b + 1], greedy[b])

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._free.append(self.slot_of.pop(id(seq)))

    def _take(self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        if not seq.cancelled:
            seq.accept(greedy if greedy is not None and seq.sampling.greedy else seq.sample(logits))
        if seq.done:     # a cancelled one is the engine's to remove (it counts it)
            self.remove(seq)


class Interleaved:
    def __init__(self, model: LanguageModel, capacity: int):
        self.model = model
        self.capacity = capacity
        self.running: list[Sequence] = []
        self._steps: dict[int, Iterator[torch.Tensor]] = {}

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.running)

    def add(self, seq: Sequence) -> None:
        s = seq.sampling
        sampling = {} if s.greedy else {"do_sample": True, "temperature": s.temperature,
                                        "top_p": s.top_p if s.top_p < 1.0 else None, "seed": s.seed}
        # EOS, stop strings and max_tokens are the sequence's to apply (it trims a stop string off).
        self._steps[id(seq)] = self.model.stream([seq.prompt_ids], s.max_tokens, ignore_eos=True, **sampling)
        self.running.append(seq)
        self._advance(seq)

    def step(self) -> None:
        for seq in list(self.running):
            self._advance(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._steps.pop(id(seq)).close()

    def _advance(self, seq: Sequence) -> None:
        if not seq.cancelled:
            token = next(self._steps[id(seq)], None)
            if token is None:        # the stream ran out (it stops at max_tokens, as the sequence does)
                seq.end("length")
            else:
                seq.accept(int(token[0]))
        if seq.done:     # a cancelled one is the engine's to remove (it counts it)
            self.remove(seq)


def running_batch(model: LanguageModel, capacity: int) -> RecurrentSlots | PagedDecoders | Interleaved:
    """Slots of recurrent state for HGRN-Bit, a paged KV cache for the decoder family held in memory,
    interleaved single-sequence generators otherwise (offloaded decoders, BitNet)."""
    if model.spec.model_type == "hgrn_bit":
        return RecurrentSlots(model, capacity)
    if isinstance(model.module, Decoder) and model.module.layer_stream is None:
        return PagedDecoders(model, capacity)
    return Interleaved(model, capacity)
