"""`memwise bench serve`'s load: streaming requests against an OpenAI-compatible server, each timed
token by token, with Poisson arrivals or a fixed concurrency, some clients walking away midway.

Each request ends in exactly one of four states: completed (the stream ran to [DONE]), cancelled
(this client closed it on purpose), rejected (HTTP 429) or failed (anything else). While the load
runs, /health is polled so that a server which stops answering shows up in the counts; afterwards
the server's own view (/health) says whether every slot and queue entry came back.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from memwise.errors import MemwiseError

_WORDS = ("the river carries cold light past old stone houses while a small boat waits near the "
          "bridge for morning and every window holds a different story about the town its markets "
          "its bells its winters and the long patience of people who stay").split()

# How often /health is asked while the load runs, and how long the server may take afterwards to
# notice the last disconnects and free their slots.
_HEALTH_EVERY_S = 0.25
_SETTLE_S = 30.0


@dataclass
class LoadConfig:
    url: str                              # base URL, without /v1
    model: str                            # the model name requests carry
    num_requests: int = 100
    request_rate: float = math.inf        # mean arrivals per second (Poisson); inf: all at once
    max_concurrency: int | None = None
    max_tokens: int = 64
    disconnect_fraction: float = 0.0
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0
    health_path: str = "/health"          # polled during the load (a peer without /health: /v1/models)
    extra_body: dict[str, Any] | None = None    # merged into every request (e.g. a peer's logit_bias)


@dataclass
class RequestResult:
    index: int
    state: str = "failed"                 # completed | cancelled | rejected | failed
    http_status: int | None = None
    disconnect: bool = False              # this client was chosen to walk away midway
    start_s: float = 0.0                  # sent, seconds after the load began
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0                # completion_tokens from usage (else the chunks with text)
    prompt_tokens: int | None = None      # from usage, when the server sends it
    replica: str | None = None            # X-Memwise-Replica: which Ray Serve replica answered
    chunks: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.state != "completed" or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def builtin_prompts(count: int, seed: int = 0) -> list[str]:
    """Deterministic prompts of 4 to 20 words from a fixed word list (same seed, same prompts); short
    enough (at most 199 bytes) that the tiny presets' 256-token context keeps room to generate."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 20))) for _ in range(count)]


def prompts_of_tokens(count: int, tokens: int, encode: Callable[[str], list[int]], seed: int = 0) -> list[str]:
    """`count` prompts of the built-in words, each the longest that `encode` makes at most `tokens`
    ids of (as `vllm bench serve --random-input-len` sizes its prompts by the model's tokenizer).

    The same words give a byte tokenizer (the synthetic presets') about five ids a word and a
    subword vocabulary about one, so a prompt set fixed in words is a different load on each."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = []
        while len(encode(" ".join(words))) <= tokens:
            words.append(rng.choice(_WORDS))
        text = " ".join(words)
        low, high = 0, len(text)          # the longest prefix within `tokens` ids: encode grows with it
        while low < high:
            mid = (low + high + 1) // 2
            if len(encode(text[:mid])) <= tokens:
                low = mid
            else:
                high = mid - 1
        prompt = text[:low]
        if not prompt:
            raise MemwiseError(f"--prompt-tokens {tokens}: too few for the tokenizer to hold any text "
                               f"(an empty prompt is already {len(encode(''))} tokens)")
        prompts.append(prompt)
    return prompts


def read_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file: each line a string or an object with a "prompt" string."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise MemwiseError(f"--prompts-file {path}: cannot read it ({e.strerror})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise MemwiseError(f"--prompts-file {path}:{number}: not JSON") from None
        text = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text:
            raise MemwiseError(f"--prompts-file {path}:{number}: expected a non-empty string or "
                               "{\"prompt\": \"...\"}")
        prompts.append(text)
    if not prompts:
        raise MemwiseError(f"--prompts-file {path}: holds no prompts")
    return prompts


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of `rate` per second; all 0 at inf."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _headers(config: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


async def _one(client: Any, config: LoadConfig, result: RequestResult, prompt: str, t0: float) -> None:
    body = {"model": config.model, "prompt": prompt, "max_tokens": config.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(config.extra_body or {})}
    # A disconnecting client leaves after a quarter of its tokens' worth of chunks (at least one):
    # early enough that a short or stop-trimmed stream has not already ended by itself.
    leave_after = max(1, config.max_tokens // 4) if result.disconnect else None
    sent = time.perf_counter()
    result.start_s = sent - t0
    last, finish = None, None
    async with client.stream("POST", config.url + "/v1/completions", json=body, headers=_headers(config)) as r:
        result.http_status = r.status_code
        result.replica = r.headers.get("x-memwise-replica")
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            result.state = "rejected" if r.status_code == 429 else "failed"
            result.error = f"HTTP {r.status_code}: {text[:200]}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                result.state = "completed"
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = str(chunk["error"].get("message"))[:200]
                break
            if chunk.get("usage"):
                result.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                result.prompt_tokens = chunk["usage"].get("prompt_tokens")
            # A chunk with a choice is a token (memwise sends one per token, with empty text while
            # it holds text back); usage-only chunks are not.
            if not chunk.get("choices"):
                continue
            finish = chunk["choices"][0].get("finish_reason") or finish
            now = time.perf_counter()
            if last is None:
                result.ttft_s = now - sent
            else:
                result.itl_s.append(now - last)
            last = now
            result.chunks += 1
            if leave_after is not None and result.chunks >= leave_after:
                result.state = "cancelled"
                break
    result.e2e_s = time.perf_counter() - sent
    if result.state == "completed" and result.output_tokens == 0:
        # A server without usage (llama.cpp's): "length" means max_tokens were made, whatever the
        # chunks (it sends none for a token without text); else one token per chunk.
        result.output_tokens = config.max_tokens if finish == "length" else result.chunks


async def _guarded(client: Any, config: LoadConfig, result: RequestResult, prompt: str, t0: float,
                   gate: asyncio.Semaphore | None) -> None:
    try:
        if gate is None:
            await _one(client, config, result, prompt, t0)
        else:
            async with gate:
                await _one(client, config, result, prompt, t0)
    except Exception as e:      # a transport failure is this request's, counted, not the run's
        result.state, result.error = "failed", f"{type(e).__name__}: {e}"[:200]


async def _watch_health(client: Any, config: LoadConfig, stop: asyncio.Event, log: dict[str, int]) -> None:
    while not stop.is_set():
        try:
            r = await client.get(config.url + config.health_path, headers=_headers(config), timeout=10.0)
            log["ok" if r.status_code == 200 else "bad"] += 1
        except Exception:
            log["bad"] += 1
        try:
            await asyncio.wait_for(stop.wait(), _HEALTH_EVERY_S)
        except asyncio.TimeoutError:
            pass


async def _run_load(config: LoadConfig, prompts: list[str]) -> tuple[list[RequestResult], float, dict[str, int]]:
    import httpx

    rng = random.Random(config.seed + 1)
    leaving = set(rng.sample(range(config.num_requests), round(config.disconnect_fraction * config.num_requests)))
    results = [RequestResult(i, disconnect=i in leaving) for i in range(config.num_requests)]
    offsets = arrival_offsets(config.num_requests, config.request_rate, config.seed)
    gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    limits = httpx.Limits(max_connections=config.num_requests + 2, max_keepalive_connections=32)
    timeout = httpx.Timeout(config.timeout_s, connect=60.0)
    health = {"ok": 0, "bad": 0}
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client, \
            httpx.AsyncClient(timeout=timeout) as probe:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_health(probe, config, stop, health))
        t0 = time.perf_counter()
        tasks = []
        for result, offset in zip(results, offsets):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            prompt = prompts[result.index % len(prompts)]
            tasks.append(asyncio.create_task(_guarded(client, config, result, prompt, t0, gate)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        stop.set()
        await watcher
    return results, duration, health


def run_load(config: LoadConfig, prompts: list[str]) -> tuple[list[RequestResult], float, dict[str, int]]:
    """Send the load; returns each request's result, the wall time from first send to last end, and
    how many /health polls were answered 200 ("ok") or not ("bad") meanwhile."""
    return asyncio.run(_run_load(config, prompts))


def server_state(url: str, api_key: str | None = None) -> dict[str, Any] | None:
    """What the server's /health says (None if it does not answer with JSON)."""
    import httpx

    try:
        r = httpx.get(url + "/health", headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                      timeout=10.0)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def leak_check(url: str, api_key: str | None = None, settle_s: float = _SETTLE_S) -> dict[str, Any]:
    """Wait until the server reports nothing running, nothing queued, every slot (and KV block) free; "ok" is
    None when the server does not report those counts (not a memwise server)."""
    deadline = time.monotonic() + settle_s
    while True:
        state = server_state(url, api_key)
        if state is None or not {"running", "queued", "free_slots", "capacity"} <= state.keys():
            return {"ok": None, "state": state, "reason": "/health does not report running/queued/free_slots"}
        idle = state["running"] == 0 and state["queued"] == 0 and state["free_slots"] == state["capacity"]
        idle = idle and state.get("free_kv_blocks") == state.get("kv_blocks")     # equal when not reported
        if idle or time.monotonic() > deadline:
            return {"ok": idle, "state": state,
                    "reason": None if idle else f"not idle {settle_s:g} s after the load: {state}"}
        time.sleep(0.1)


def results_as_dicts(results: list[RequestResult]) -> list[dict[str, Any]]:
    return [{**asdict(r), "tpot_s": r.tpot_s} for r in results]
