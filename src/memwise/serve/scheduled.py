"""What the running batches share: a step's token budget, split between decodes and prompt chunks."""
from __future__ import annotations

import torch

from memwise.language_model import LanguageModel
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
