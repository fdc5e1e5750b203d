"""memwise serve: the OpenAI client against an in-process server on tiny models."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import memwise  # noqa: E402
from memwise.serve.app import ServeConfig, create_app  # noqa: E402
from memwise.serve.chat import load_chat_template  # noqa: E402
from memwise.serve.protocol import Sampling  # noqa: E402
from memwise.serve.sequence import Sequence  # noqa: E402
from memwise.tokenizer import decode_stream  # noqa: E402

from hgrn_checkpoints import hgrn_config, write_hgrn_checkpoint  # noqa: E402

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


class Gate:
    """Wraps a model's forward: records each call's batch size, and holds calls while closed."""

    def __init__(self, module: torch.nn.Module):
        self.open = threading.Event()
        self.open.set()
        self.batches: list[int] = []
        self.delay = 0.0
        inner = module.forward

        def forward(input_ids, *args, **kwargs):
            self.open.wait()
            self.batches.append(input_ids.shape[0])
            if self.delay:
                time.sleep(self.delay)
            return inner(input_ids, *args, **kwargs)
        module.forward = forward


class Running:
    def __init__(self, model, **config):
        self.model = model
        self.gate = Gate(model.module)
        self.app = create_app(model, ServeConfig("tiny", **config))
        self.engine = self.app.state.server.engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def stop(self) -> None:
        self.gate.open.set()
        self.server.should_exit = True
        self.thread.join(30)


def until(condition, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def submit_all(running, model, prompts: list[list[int]], lengths: list[int]) -> list[Sequence]:
    """Queue greedy sequences while the model is held, release it, and wait until all have finished."""
    running.gate.open.clear()
    sequences = [Sequence(ids, Sampling(n, temperature=0.0), lambda event: None, decode_stream(model.tokenizer))
                 for ids, n in zip(prompts, lengths)]
    for seq in sequences:
        running.engine.submit(seq)
    running.gate.open.set()
    until(lambda: all(s.done for s in sequences), "every sequence finishes")
    return sequences


@pytest.fixture(scope="module")
def tiny():
    return memwise.load("preset:tiny-mmfree")


@pytest.fixture()
def serve(tiny):
    started = []

    def start(model=None, **config):
        running = Running(model or memwise.load("preset:tiny-mmfree"), **config)
        started.append(running)
        return running
    yield start
    for running in started:
        running.stop()


def byte_level_checkpoint(directory: Path) -> Path:
    """A tiny HGRN-Bit checkpoint with a byte-level tokenizer.json and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    write_hgrn_checkpoint(directory, hgrn_config(vocab_size=301, max_position_embeddings=512))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "</s>"}))
    return directory


def test_completion_matches_generate_and_counts_usage(serve, tiny):
    running = serve()
    client = running.client()
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0)
    assert r.choices[0].text == tiny.generate_text("Hello there", 12)
    assert r.usage.prompt_tokens == len("Hello there".encode())
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stop_string_ends_and_is_cut(serve, tiny):
    client = serve().client()
    reference = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0).choices[0].text
    k = next(k for k in range(2, len(reference) - 2) if reference.find(reference[k:k + 2]) == k)
    stop = reference[k:k + 2]
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == reference[:k] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reference[:k]


def test_chat_renders_the_template(serve, tmp_path):
    directory = byte_level_checkpoint(tmp_path / "chat")
    model = memwise.load(directory)
    running = serve(model, chat_template=load_chat_template(directory))
    client = running.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    prompt = "<system>be brief\n<user>hi\n<assistant>"
    expected = model.generate_text(prompt, 8)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_without_template_is_a_400(serve):
    client = serve().client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in e.value.body["message"]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": "x" * 2100}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", ""]}, 400, "stop"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "seed": 2**64}, 400, "seed"),
    ([1, 2], 400, None),
])
def test_bad_requests_get_openai_errors(serve, body, status, param):
    running = serve()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(running.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_unknown_route_and_method_are_openai_errors(serve):
    running = serve()
    assert httpx.get(running.url + "/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(running.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_api_key(serve):
    running = serve(api_key="sesame")
    with pytest.raises(openai.AuthenticationError) as e:
        running.client("wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(running.url + "/v1/models").status_code == 401
    assert running.client("sesame").models.list().data[0].id == "tiny"
    assert running.client("sesame").completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_full_queue_is_a_429_with_retry_after(serve):
    running = serve(max_batch=1, max_queue=1)
    running.gate.open.clear()       # the first request's prefill waits inside the engine
    client = running.client()
    results = []
    first = threading.Thread(target=lambda: results.append(
        client.completions.create(model="tiny", prompt="a", max_tokens=3, temperature=0)))
    first.start()
    until(lambda: running.engine.free_slots == 0, "the first request takes the slot")
    second = threading.Thread(target=lambda: results.append(
        client.completions.create(model="tiny", prompt="b", max_tokens=3, temperature=0)))
    second.start()
    until(lambda: running.engine.waiting.qsize() == 1, "the second request waits")
    r = httpx.post(running.url + "/v1/completions", json={"model": "tiny", "prompt": "c", "max_tokens": 3})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    running.gate.open.set()
    first.join(30), second.join(30)
    assert [len(x.choices) for x in results] == [1, 1]


def test_disconnect_frees_the_slot(serve):
    running = serve(max_batch=2)
    running.gate.delay = 0.005      # 2000 steps would take 10 s: the disconnect must cut it short
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", running.url + "/v1/completions", json=body) as r:
        first = next(r.iter_lines())
        assert '"choices"' in first, first
        # the slot is counted by the engine thread, which may run a moment after the first chunk left
        until(lambda: running.engine.free_slots == 1, "the stream holds a slot")
    until(lambda: running.engine.free_slots == 2, "the slot comes back")
    metrics = httpx.get(running.url + "/metrics").text
    assert "memwise_cancelled_sequences_total 1.0" in metrics
    generated = next(float(line.split()[1]) for line in metrics.splitlines()
                     if line.startswith("memwise_generation_tokens_total "))
    assert 1 <= generated < 2000


def test_concurrent_requests_match_each_alone(serve, tiny):
    """Greedy tokens of sequences that join and leave a running batch equal those each makes alone."""
    running = serve(max_batch=4)
    engine = running.engine
    prompts = [[5, 6, 7], [100, 3], [9] * 20, [44, 45, 46, 47], [1, 2], [300, 301, 302]]
    lengths = [30, 7, 19, 25, 12, 16]
    alone = []
    for ids, n in zip(prompts, lengths):
        out = tiny.generate([ids], n, ignore_eos=True)
        alone.append(out[0, len(ids):].tolist())
    running.gate.open.clear()
    sequences = [Sequence(ids, Sampling(n, temperature=0.0), lambda event: None, decode_stream(tiny.tokenizer))
                 for ids, n in zip(prompts, lengths)]
    for seq in sequences:
        engine.submit(seq)
    running.gate.open.set()
    until(lambda: all(s.done for s in sequences), "every sequence finishes")
    assert [s.generated for s in sequences] == alone
    assert max(running.gate.batches) > 1                # they did run as one batch
    until(lambda: engine.free_slots == 4, "the slots come back")


def test_concurrent_http_requests_match_sequential(serve):
    running = serve(max_batch=3)
    client = running.client()
    prompts = ["one", "second prompt", "3", "the fourth"]
    sequential = [client.completions.create(model="tiny", prompt=p, max_tokens=10 + i, temperature=0).choices[0].text
                  for i, p in enumerate(prompts)]
    results = [None] * len(prompts)

    def ask(i: int) -> None:
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10 + i,
                                               temperature=0).choices[0].text
    running.gate.open.clear()
    running.gate.batches.clear()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    engine = running.engine
    until(lambda: engine.waiting.qsize() + engine.capacity - engine.free_slots == len(prompts), "all arrive")
    running.gate.open.set()
    for t in threads:
        t.join(30)
    assert results == sequential
    assert max(running.gate.batches) == 3       # a full batch; the fourth joined when a slot came free


@pytest.mark.parametrize("preset", ["preset:tiny-bitnet"])
def test_other_families_interleave_and_match_alone(serve, preset):
    """BitNet runs its sequences one at a time between steps; each still gets its own tokens."""
    model = memwise.load(preset)
    prompts, lengths = [[5, 6, 7], [100, 3, 4, 5, 6], [9] * 11], [9, 4, 13]
    alone = [model.generate([ids], n, ignore_eos=True)[0, len(ids):].tolist() for ids, n in zip(prompts, lengths)]
    running = serve(model, max_batch=2)
    sequences = submit_all(running, model, prompts, lengths)
    assert [s.generated for s in sequences] == alone


def test_health_models_metrics(serve):
    running = serve()
    client = running.client()
    client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0)
    assert httpx.get(running.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    text = httpx.get(running.url + "/metrics").text
    for name in ("memwise_queue_length", "memwise_running_sequences", "memwise_time_to_first_token_seconds_bucket",
                 "memwise_time_per_output_token_seconds_count", "memwise_e2e_request_latency_seconds_count",
                 "memwise_resident_memory_bytes"):
        assert name in text
    assert 'memwise_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert "memwise_prompt_tokens_total 2.0" in text


def test_sampling_with_a_seed_repeats(serve):
    client = serve().client()
    a, b = (client.completions.create(model="tiny", prompt="x", max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def _cli(*args: str) -> list[str]:
    import sys
    return [sys.executable, "-c", "import sys; from memwise.cli import main; sys.exit(main())", "serve", *args]


def test_cli_serves_and_stops_on_sigterm():
    import os
    import signal
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(_cli("preset:tiny-mmfree", "--port", str(port), "--served-name", "tiny"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False
        until(healthy, "the server answers", limit=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_a_zero_batch():
    import os
    import subprocess
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(_cli("preset:tiny-mmfree", "--max-batch", "0"), env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "--max-batch must be >= 1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_model_without_tokenizer_is_refused_at_start(tmp_path):
    write_hgrn_checkpoint(tmp_path / "bare", hgrn_config())
    with pytest.raises(memwise.MemwiseError, match="no tokenizer.json"):
        create_app(memwise.load(tmp_path / "bare"), ServeConfig("bare"))
