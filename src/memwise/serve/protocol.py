"""Request shapes of the OpenAI completions and chat APIs, checked into plain dataclasses, and the
error body every refusal carries."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any


class ApiError(Exception):
    """A refusal with an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """What a request asks of generation: the fields the engine reads."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class CompletionRequest:
    model: str
    prompt: str | list[int] | None       # text or token ids (completions); None for chat
    messages: list[dict[str, str]] | None
    sampling: Sampling
    stream: bool = False
    include_usage: bool = field(default=True)


def parse_request(body: Any, chat: bool, default_max_tokens: int) -> CompletionRequest:
    """The request of a /v1/completions (chat=False) or /v1/chat/completions body; ApiError 400 on a bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model must be a non-empty string", "model")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 (only one choice per request is supported), got {n!r}", "n")
    prompt, messages = None, None
    if chat:
        messages = _messages(body.get("messages"))
    else:
        prompt = _prompt(body.get("prompt"))
    limit_field = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(limit_field)
    max_tokens = default_max_tokens if max_tokens is None else _integer(limit_field, max_tokens, low=1)
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else _number("temperature", temperature, 0.0, 2.0)
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else _number("top_p", top_p, 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "top_p must be > 0", "top_p")
    seed = body.get("seed")
    seed = None if seed is None else _integer("seed", seed, low=0, high=2**64 - 1)   # torch's seed range
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage", True)) if isinstance(options, dict) else True
    sampling = Sampling(max_tokens, temperature, top_p, seed, _stop(body.get("stop")))
    return CompletionRequest(model, prompt, messages, sampling, stream, include_usage)


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low
            or (high is not None and value > high)):
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"{name} must be an integer {expected}, got {value!r}", name)
    return int(value)


def _number(name: str, value: Any, low: float, high: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not low <= value <= high):
        raise ApiError(400, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]        # the client wraps one prompt in a list
    if isinstance(value, str) and value:
        return value
    if (isinstance(value, list) and value
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        return value
    raise ApiError(400, "prompt must be one non-empty string or one list of token ids "
                        "(batches of prompts are not supported)", "prompt")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):   # content parts: only text parts are understood
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}]")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}]")
        out.append({"role": message["role"], "content": content})
    return out


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or len(items) > 4
            or not all(isinstance(s, str) and s for s in items)):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 non-empty strings", "stop")
    return tuple(items)
