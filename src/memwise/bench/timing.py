"""What an engine reports of one timed generation (engines.py, llama_cpp_engine.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class GenerationTiming:
    ttft_s: float           # call start to the first new token on the host
    e2e_s: float            # call start to return
    new_tokens: int         # tokens generated per sequence (checked against the request)
    counters: dict[str, Any] | None = None     # the engine's own timers for this run, where it has them
