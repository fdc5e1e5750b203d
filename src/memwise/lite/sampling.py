"""Choosing the next token from float32 logits [B, V] with numpy: greedy, or sampled with temperature, top-k, top-p."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memwise.errors import MemwiseError


@dataclass
class Sampling:
    """How the next token is chosen. Greedy unless do_sample; the filters follow Hugging Face's
    meaning: temperature divides the logits, top_k keeps the k largest, top_p the smallest set of
    tokens whose probabilities reach p (the most likely token always stays)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise MemwiseError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise MemwiseError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MemwiseError(f"top_p must be in (0, 1], got {self.top_p}")


class TokenChooser:
    """Applies one Sampling to each step's logits; owns the random generator of one generation."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self._rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """int64 [B] token ids for logits [B, V] (first largest when greedy, as torch's max)."""
        if not self.sampling.do_sample:
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([self._sample(row) for row in logits], dtype=np.int64)

    def _sample(self, row: np.ndarray) -> int:
        s = self.sampling
        scaled = row.astype(np.float64) / s.temperature
        order = np.argsort(-scaled, kind="stable")
        if s.top_k:
            order = order[:s.top_k]
        kept = scaled[order]
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if s.top_p < 1:
            # keep tokens while the mass before them is below p: the first always stays
            before = np.cumsum(probs) - probs
            keep = before < s.top_p
            order, probs = order[keep], probs[keep]
            probs /= probs.sum()
        return int(order[self._rng.choice(len(order), p=probs)])
