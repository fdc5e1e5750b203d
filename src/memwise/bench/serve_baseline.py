"""The one-request-at-a-time baseline for `memwise bench serve`: Hugging Face transformers behind a
minimal OpenAI-compatible server, as people serve a model with a few lines of FastAPI.

`python -m memwise.bench.serve_baseline SOURCE --port P` loads SOURCE as the bench's transformers
engine does (a preset: transformers' own random init of the same config), and answers
`POST /v1/completions` (a prompt string or list of token ids, `max_tokens`, `temperature` 0 for
greedy, `stream` with one server-sent event per token and `usage` in the last chunk), `GET /v1/models`
and `GET /health` (memwise serve's counts, so the bench's leak check reads it too). Requests wait in
arrival order for one lock: the model generates for one request at a time, with `model.generate`.
Text is encoded and decoded with the tokenizer memwise gives the same source, so prompts have the
same token counts on both servers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator


class Baseline:
    def __init__(self, source: str, name: str, threads: int | None):
        import torch

        from memwise.bench.engines import TransformersEngine
        from memwise.bench.sources import resolve
        from memwise.tokenizer import ByteTokenizer, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        resolved = resolve(source)
        if resolved.problem:
            raise SystemExit(f"serve_baseline: {resolved.problem}")
        engine = TransformersEngine()
        reason = engine.can_run(resolved, "cpu")
        if reason:
            raise SystemExit(f"serve_baseline: {reason}")
        engine.load(resolved, "float32", "cpu")
        self.model = engine.model
        vocab = int(self.model.get_input_embeddings().weight.shape[0])
        tokenizer = load_tokenizer(Path(resolved.source)) if resolved.kind == "local" else None
        self.tokenizer = tokenizer or ByteTokenizer(vocab)
        self.name = name
        self.lock = asyncio.Lock()
        self.model_lock = threading.Lock()
        self.waiting = 0
        self.running = 0

    def generate(self, ids: list[int], max_tokens: int, temperature: float, put: Any, stop: threading.Event) -> None:
        """model.generate for one request, calling put(token id) as each comes (from this thread)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Streamer:
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:        # transformers hands the streamer the prompt first
                    self.prompt_seen = True
                    return
                put(int(value.reshape(-1)[0]))

            def end(self) -> None:
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        config = self.model.config
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            tensor = torch.tensor([ids], dtype=torch.long)
            self.model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_tokens,
                                pad_token_id=pad, streamer=Streamer(), stopping_criteria=StoppingCriteriaList([Stop()]),
                                **sampling)


def _error(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=status)


def create_app(baseline: Baseline) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
            prompt = body["prompt"]
            ids = list(prompt) if isinstance(prompt, list) else baseline.tokenizer.encode(prompt)
            max_tokens = int(body.get("max_tokens", 16))
            temperature = float(body.get("temperature", 1.0))
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, f"bad request: {e}")
        if not ids or max_tokens < 1:
            return _error(400, "need a non-empty prompt and max_tokens >= 1")
        events = _events(baseline, ids, max_tokens, temperature)
        if body.get("stream"):
            return StreamingResponse(_sse(baseline, events, len(ids)), media_type="text/event-stream")
        tokens = [t async for t in events]
        return JSONResponse(_completion(baseline, baseline.tokenizer.decode(tokens), len(ids), len(tokens)))

    async def models(request: Request) -> Any:
        return JSONResponse({"object": "list", "data": [{"id": baseline.name, "object": "model", "owned_by": "transformers"}]})

    async def health(request: Request) -> Any:
        return JSONResponse({"status": "ok", "running": baseline.running, "queued": baseline.waiting,
                             "free_slots": 1 - baseline.running, "capacity": 1})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models), Route("/health", health)])


async def _events(baseline: Baseline, ids: list[int], max_tokens: int, temperature: float) -> AsyncIterator[int]:
    """The request's token ids as they come; it waits its turn for the model first."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue[int | None] = asyncio.Queue()
    stop = threading.Event()

    def put(token: int) -> None:
        loop.call_soon_threadsafe(tokens.put_nowait, token)

    def run() -> None:
        # The thread lock too: a cancelled request's generation ends at its next token, after the
        # asyncio lock is already released, and must not overlap the next one's.
        try:
            with baseline.model_lock:
                baseline.generate(ids, max_tokens, temperature, put, stop)
        finally:
            loop.call_soon_threadsafe(tokens.put_nowait, None)

    baseline.waiting += 1
    acquired = False
    try:
        async with baseline.lock:
            baseline.waiting -= 1
            acquired = True
            baseline.running = 1
            try:
                worker = loop.run_in_executor(None, run)
                while (token := await tokens.get()) is not None:
                    yield token
                await worker
            finally:
                stop.set()      # a client that went away stops its generation at the next token
                baseline.running = 0
    finally:
        if not acquired:
            baseline.waiting -= 1


def _completion(baseline: Baseline, text: str, prompt_tokens: int, completion_tokens: int,
                stream: bool = False) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
            "model": baseline.name, "choices": [{"index": 0, "text": text, "finish_reason": None if stream else "length",
                                                 "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def _sse(baseline: Baseline, events: AsyncIterator[int], prompt_tokens: int) -> AsyncIterator[str]:
    from memwise.tokenizer import decode_stream

    text = decode_stream(baseline.tokenizer)
    count = 0
    async for token in events:
        count += 1
        chunk = _completion(baseline, text.step(token), 0, 0, stream=True)
        del chunk["usage"]
        yield f"data: {json.dumps(chunk)}\n\n"
    last = _completion(baseline, "", prompt_tokens, count, stream=True)
    last["choices"] = []
    yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m memwise.bench.serve_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-name")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    uvicorn.run(create_app(Baseline(args.source, args.served_name or args.source, args.threads)),
                host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
