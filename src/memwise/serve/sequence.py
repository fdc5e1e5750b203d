"""One request as the engine sees it: its prompt ids, what it asks for, and the text it has made so
far, with EOS, stop strings and max_tokens applied token by token."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from memwise.generate import GenerationOptions, sample_next
from memwise.kernels import greedy_tokens
from memwise.serve.protocol import Sampling
from memwise.tokenizer import TextStream


@dataclass
class Event:
    """What a client receives: new text, and on the last event why the sequence ended."""

    text: str
    finish_reason: str | None = None     # "stop", "length", "abort" (server shutting down), "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Sequence:
    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]        # thread-safe: called from the engine thread
    stream: TextStream                   # the tokenizer's incremental decoder
    eos_token_ids: tuple[int, ...] = ()
    cancelled: bool = False              # set by the client side; the engine drops it at the next step
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    _pending: str = ""                   # text held back: it may be the start of a stop string
    _generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's float32 logits [1, V]."""
        if self.sampling.greedy:
            return int(greedy_tokens(logits)[0])
        if self._generator is None:
            self._generator = torch.Generator(device=logits.device)
            seed = self.sampling.seed
            self._generator.manual_seed(seed if seed is not None else torch.seed())
        top_p = self.sampling.top_p if self.sampling.top_p < 1.0 else None
        options = GenerationOptions(max_new_tokens=1, do_sample=True, temperature=self.sampling.temperature,
                                    top_p=top_p)
        return int(sample_next(logits, options, self._generator)[0])

    def accept(self, token: int) -> None:
        """Take the next token: emit the text that is certain, and finish on EOS, a stop string or max_tokens."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        if token in self.eos_token_ids:
            self.generated.append(token)
            self._finish("stop", self._pending)
            return
        self.generated.append(token)
        self._pending += self.stream.step(token)
        stops = self.sampling.stop
        if stops:
            found = [i for i in (self._pending.find(s) for s in stops) if i >= 0]
            if found:
                self._finish("stop", self._pending[:min(found)])
                return
        if len(self.generated) >= self.sampling.max_tokens:
            self._finish("length", self._pending)
            return
        keep = max((len(s) for s in stops), default=1) - 1
        ready = self._pending[:len(self._pending) - keep] if keep else self._pending
        self._pending = self._pending[len(ready):]
        # One event per token, empty while text is held back (a stop string's start, part of a UTF-8
        # character): a streaming client can time every token, as a load test must.
        self.emit(Event(ready))

    def end(self, reason: str, message: str = "") -> None:
        """Finish from outside: "abort" when the server stops, "error" with why the model refused it,
        "length" when the model's stream ran out."""
        self._finish(reason, self._pending if reason == "length" else message)

    def _finish(self, reason: str, text: str) -> None:
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        self._pending = ""
        self.emit(Event(text, reason, len(self.prompt_ids), len(self.generated)))
