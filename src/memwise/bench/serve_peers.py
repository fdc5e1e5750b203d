"""The servers `memwise bench serve --engine ...` can start beside memwise's own, each in a fresh
process on a free 127.0.0.1 port, so that one run loads all of them with the same prompts and rate:

- "memwise": `memwise serve MODEL` (continuous batching).
- "transformers": memwise.bench.serve_baseline, one request at a time with Hugging Face generate.
- "llama.cpp": llama-cpp-python's server (`python -m llama_cpp.server`) on the GGUF file memwise's
  peers suite writes (bench.gguf_export, F32 like memwise's float32; cached, written before the
  server starts). It serves one request at a time too (queued, not interrupted). It has no /health, so its liveness is polled
  on /v1/models, and it sends no `usage` on streams, so its tokens are its chunks.

A peer whose server cannot start here is skipped with the reason (for llama.cpp, the install command).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

ENGINES = ("memwise", "transformers", "llama.cpp")

LLAMA_SERVER_HINT = ("llama.cpp's server needs llama-cpp-python's server extras: pip install "
                     "'llama-cpp-python[server]' (or, to keep the llama.cpp build you have: pip install "
                     "fastapi uvicorn sse-starlette starlette-context pydantic-settings)")
_LLAMA_SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


@dataclass
class PeerServer:
    engine: str
    command: list[str] | None           # None: memwise serve, built by LaunchedServer itself
    health_path: str = "/health"        # what answers 200 while the server is up
    weights: str = ""                   # what it serves, in words (e.g. the GGUF file and its type)
    tokenize_path: str | None = None    # where to count a prompt's tokens when its stream has no usage
    extra_body: dict | None = None      # sent with every request to this server


def llama_server_missing() -> str | None:
    """None when llama_cpp.server can start here, else why not and what to install."""
    missing = [m for m in _LLAMA_SERVER_MODULES if importlib.util.find_spec(m) is None]
    return f"{LLAMA_SERVER_HINT} (missing: {', '.join(missing)})" if missing else None


def peer_server(engine: str, model: str, port: int, served_name: str, threads: int | None) -> PeerServer:
    """How to start `engine`'s server for `model`; raises SkipEngine when it cannot run here."""
    if engine == "memwise":
        return PeerServer(engine, None, weights="memwise float32")
    if engine == "transformers":
        command = [sys.executable, "-m", "memwise.bench.serve_baseline", model, "--host", "127.0.0.1",
                   "--port", str(port), "--served-name", served_name]
        if threads:
            command += ["--threads", str(threads)]
        return PeerServer(engine, command, weights="transformers float32, one request at a time")
    if engine == "llama.cpp":
        reason = llama_server_missing()
        if reason:
            raise SkipEngine(reason)
        path = _gguf(model)
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                   "--port", str(port), "--model_alias", served_name, "--n_ctx", "2048",
                   # by default a new request cuts off the one streaming: they must queue instead
                   "--interrupt_requests", "False"]
        if threads:
            command += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
        # Random weights pick the GGUF's EOS now and then, and llama_cpp.server cannot be told to go
        # on (no ignore_eos): a bias keeps it generating max_tokens, the work the others do.
        eos = _gguf_eos(path)
        extra = {"logit_bias": {str(eos): -100.0}} if eos is not None else None
        return PeerServer(engine, command, health_path="/v1/models", weights=f"GGUF F32 {path}",
                          tokenize_path="/extras/tokenize", extra_body=extra)
    raise SkipEngine(f"unknown engine {engine!r} (expected one of {', '.join(ENGINES)})")


class SkipEngine(Exception):
    """This engine's server cannot run here; the message says why."""


def _gguf(model: str):
    from memwise.bench.gguf_export import export
    from memwise.bench.sources import resolve
    from memwise.errors import MemwiseError

    source = resolve(model)
    if source.problem:
        raise SkipEngine(source.problem)
    try:
        return export(source.source, "float32")
    except MemwiseError as e:       # e.g. hgrn_bit: llama.cpp has no such architecture
        raise SkipEngine(str(e)) from None


def count_prompt_tokens(url: str, path: str, prompts: list[str], requests: list[dict]) -> None:
    """Fill each request's prompt_tokens from the server's own tokenizer (`path`, llama_cpp.server's
    /extras/tokenize), for a server whose streams carry no usage."""
    import httpx

    counts: dict[str, int] = {}
    for r in requests:
        prompt = prompts[r["index"] % len(prompts)]
        if prompt not in counts:
            answer = httpx.post(url + path, json={"input": prompt}, timeout=30.0)
            answer.raise_for_status()
            counts[prompt] = len(answer.json()["tokens"])
        if r.get("prompt_tokens") is None:
            r["prompt_tokens"] = counts[prompt]


def _gguf_eos(path) -> int | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.eos_token_id")
    return None if field is None else int(field.parts[-1][0])
