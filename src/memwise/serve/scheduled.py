"""What the running batches share: a step's token budget, split between decodes and prompt chunks."""
from __future__ import annotations

import torch

from memwise.language_model import LanguageModel
from memwise.serve.sequence import Sequence


def chunk_plan(remaining: list[int], budget: int | None, min_chunk: int = 0) -> list[int]:
    """Prompt tokens to feed this step for each waiting prompt (`remaining` of each, in arrival order)
    out of `budget` tokens (None: all of them).

    Prefill always advances (at least 2 tokens when the decodes took the whole budget), and no chunk
    is a lone token unless the prompt is one token: a one-token forward takes the fused decode path,
    whose float order differs from the many-token path, so greedy tokens could differ from an
    unchunked prefill's. That may overrun the budget by a token or two.

    `min_chunk`: a prompt token costs more the fewer go through a forward together (mmfree-370m, one
    thread: 3.1 ms of CPU in a 16-token forward, 2.45 ms in a 64-token one, benchmarks/
    prefill_costs.py), so a chunk that would leave fewer than `min_chunk` tokens behind takes them too
    (overrunning the budget by less than that), and a chunk shorter than `min_chunk` that does not
    end its prompt waits for the next step, unless it is the step's first (prefill still advances)."""
    if budget is None:
        return list(remaining)
    left = max(budget, 2)
    plan: list[int] = []
    for r in remaining:
        n = min(r, max(left, 2)) if left > 0 else 0
        if n and r - n < max(min_chunk, 2):
            n = r
        if n < min(r, min_chunk) and any(plan):
            n = 0
        plan.append(n)
        left -= n
    return plan


def staircase(lengths: list[int]) -> tuple[list[int], list[int]]:
    """How to feed chunks of these `lengths` together: (the chunks that go together, longest first;
    the boundaries of the forwards, ascending). Forward k feeds positions [bounds[k-1], bounds[k]) of
    every chunk at least bounds[k] long, so each forward is a rectangle with no padding, and a chunk's
    last token is the last of a forward.

    A forward of one position would take the fused decode path, whose float order differs from the
    many-token path (see chunk_plan): a chunk whose length is one more than the previous bound, and
    a one-token chunk, is left out (fed alone, as before)."""
    together, bounds = [], []
    for length in sorted(set(lengths)):
        if length - (bounds[-1] if bounds else 0) >= 2:
            bounds.append(length)
            together += [k for k, n in enumerate(lengths) if n == length]
    together.sort(key=lambda k: -lengths[k])
    return together, bounds


class Scheduled:
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
        plan = chunk_plan([len(s.prompt_ids) - self.consumed[id(s)] for s in waiting], budget,
                          0 if self.step_tokens is None else self.step_tokens // 4)
        chunks = [(seq, seq.prompt_ids[self.consumed[id(seq)]:self.consumed[id(seq)] + n])
                  for seq, n in zip(waiting, plan) if n > 0]
        for (seq, ids), logits in zip(chunks, self._prefill_chunks(chunks)):
            self.consumed[id(seq)] += len(ids)
            if self.consumed[id(seq)] == len(seq.prompt_ids):
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

    def _prefill_chunks(self, chunks: list[tuple[Sequence, list[int]]]) -> list[torch.Tensor]:
        """Feed each sequence its chunk; the float32 logits [1, V] after each chunk's last token.
        One forward per chunk here; a batch whose rows are independent may feed several in one."""
        return [self._prefill(seq, torch.tensor([ids], dtype=torch.long, device=self.model.device))
                for seq, ids in chunks]

    def _prefill(self, seq: Sequence, ids: torch.Tensor) -> torch.Tensor:
        """Feed one chunk of `seq`'s prompt; the float32 logits [1, V] after its last token."""
        raise NotImplementedError

    def _release(self, seq: Sequence) -> None:
        raise NotImplementedError
