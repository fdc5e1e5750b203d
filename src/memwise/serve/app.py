"""The ASGI app: OpenAI-style routes over one engine, with validation, bearer keys, SSE and error bodies."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from memwise.errors import MemwiseError
from memwise.language_model import LanguageModel
from memwise.serve.chat import ChatTemplate
from memwise.serve.engine import Engine
from memwise.serve.metrics import ServeMetrics
from memwise.serve.protocol import ApiError, CompletionRequest, parse_request
from memwise.serve.sequence import Event, Sequence
from memwise.tokenizer import decode_stream

# max_tokens when a request gives none (the OpenAI completions default; chat gets more), cut to
# what the context leaves.
DEFAULT_MAX_TOKENS = {False: 16, True: 256}
# The step budget: 16 decodes plus a 112-token prompt chunk, which on a CPU keeps a newcomer's
# prefill to a few hundred ms of delay per step for the running sequences.
DEFAULT_STEP_TOKENS = 128


@dataclass
class ServeConfig:
    model_name: str
    max_batch: int = 16
    max_queue: int = 64
    api_key: str | None = None
    chat_template: ChatTemplate | None = None
    step_tokens: int | None = DEFAULT_STEP_TOKENS    # tokens one engine step computes; None: whole prompts


class Server:
    """What the routes share: the model, its engine, the metrics and the settings."""

    def __init__(self, model: LanguageModel, config: ServeConfig):
        self.model, self.config = model, config
        self.tokenizer = model.tokenizer     # a model without one cannot serve text: refused here, at start
        self.metrics = ServeMetrics(model.device)
        self.engine = Engine(model, config.max_batch, config.max_queue, self.metrics, config.step_tokens)
        self.metrics.watch_blocks(self.engine)
        self.context = model.spec.max_positions
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.config.api_key}":
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        if req.messages is not None:
            if self.config.chat_template is None:
                raise ApiError(400, f"model {self.config.model_name!r} has no chat template (no chat_template in "
                                    "its tokenizer_config.json); use /v1/completions", "messages")
            text = self.config.chat_template.render(req.messages)
        elif isinstance(req.prompt, list):
            vocab = self.model.spec.vocab_size
            bad = [t for t in req.prompt if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
            return list(req.prompt)
        else:
            text = req.prompt
        try:
            ids = self.tokenizer.encode(text)
        except MemwiseError as e:
            raise ApiError(400, str(e), "prompt") from None
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt")
        return ids

    def check_length(self, ids: list[int], req: CompletionRequest, max_tokens_given: bool) -> None:
        room = self.context - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {self.context} "
                                "tokens, and at least one must be left to generate", "prompt",
                           code="context_length_exceeded")
        if not max_tokens_given:
            req.sampling.max_tokens = min(req.sampling.max_tokens, room)
        elif req.sampling.max_tokens > room:
            raise ApiError(400, f"max_tokens {req.sampling.max_tokens} + the prompt's {len(ids)} tokens exceed "
                                f"this model's context of {self.context} tokens", "max_tokens",
                           code="context_length_exceeded")


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


async def _generate(request: Request, chat: bool) -> Response:
    server: Server = request.app.state.server
    server.check_key(request)
    body = await _body(request)
    req = parse_request(body, chat, DEFAULT_MAX_TOKENS[chat])
    if req.model != server.config.model_name:
        raise ApiError(404, f"model {req.model!r} does not exist; this server runs {server.config.model_name!r}",
                       "model", code="model_not_found")
    ids = server.prompt_ids(req)
    server.check_length(ids, req, "max_tokens" in body or "max_completion_tokens" in body)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    seq = Sequence(ids, req.sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                   decode_stream(server.tokenizer), server.model.spec.eos_token_ids)
    server.engine.submit(seq)
    shape = _Shape(chat, req.model)
    if req.stream:
        return StreamingResponse(_sse(seq, events, shape, req.include_usage), media_type="text/event-stream")
    texts = []
    try:
        while True:
            event = await events.get()
            if event.finish_reason in ("abort", "error"):
                raise _failure(event)
            texts.append(event.text)
            if event.finish_reason:
                return JSONResponse(shape.whole("".join(texts), event))
    finally:
        seq.cancelled = True    # a no-op once done; frees the slot if the client went away


class _Shape:
    """The response objects of one request, completions or chat."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(event: Event) -> dict[str, int]:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def whole(self, text: str, event: Event) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": event.finish_reason, "logprobs": None}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(event)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(event)}

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, event: Event) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage(event)}


def _failure(event: Event) -> ApiError:
    if event.finish_reason == "error":
        return ApiError(400, event.text)
    return ApiError(503, "the server stopped before the completion was done", kind="server_error")


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(seq: Sequence, events: asyncio.Queue[Event], shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; the sequence is cancelled if the client goes away."""
    try:
        if shape.chat:
            yield _data(shape.chunk("", None, role=True))
        while True:
            event = await events.get()
            if event.finish_reason in ("abort", "error"):
                yield _data(_failure(event).body())
                break
            yield _data(shape.chunk(event.text, event.finish_reason))
            if event.finish_reason:
                if include_usage:
                    yield _data(shape.usage_chunk(event))
                break
        yield "data: [DONE]\n\n"
    finally:
        seq.cancelled = True


async def models(request: Request) -> Response:
    server: Server = request.app.state.server
    server.check_key(request)
    entry = {"id": server.config.model_name, "object": "model", "created": server.created, "owned_by": "memwise"}
    return JSONResponse({"object": "list", "data": [entry]})


async def health(request: Request) -> Response:
    engine = request.app.state.server.engine
    if engine.error is not None:
        return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
    # running and queued: what a load test reads afterwards to see that nothing leaked
    state = {"status": "ok", "free_slots": engine.free_slots, "capacity": engine.capacity,
             "running": engine.running, "queued": engine.queued}
    if engine.kv_blocks is not None:
        state["free_kv_blocks"], state["kv_blocks"] = engine.kv_blocks
    return JSONResponse(state)


async def metrics(request: Request) -> Response:
    server: Server = request.app.state.server
    return Response(server.metrics.render(), media_type=server.metrics.content_type)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                     code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")
    return JSONResponse(error.body(), status_code=500)


class _CountRequests:
    """Counts every HTTP request by route and status (unknown paths as "other")."""

    def __init__(self, app: Starlette, metrics: ServeMetrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()


def create_app(model: LanguageModel, config: ServeConfig) -> Starlette:
    """The app; the engine thread starts with the app's lifespan and stops (aborting what runs) with it."""
    server = Server(model, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected},
                    middleware=[Middleware(_CountRequests, metrics=server.metrics, paths={r.path for r in routes})])
    app.state.server = server
    return app
