"""The peers of `memwise bench serve --engine ...`: the one-request-at-a-time transformers server, the
llama.cpp server's skip, and one run over several engines."""
from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

from memwise.bench import serve_peers  # noqa: E402
from memwise.bench.serve_baseline import Baseline, create_app  # noqa: E402
from memwise.bench.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def baseline_url():
    baseline = Baseline("preset:tiny-gpt2", "tiny", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(baseline), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", baseline
    server.should_exit = True
    thread.join(30)


def test_baseline_answers_the_openai_client_with_transformers_greedy_tokens(baseline_url):
    import torch

    url, baseline = baseline_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    ids = [5, 6, 7, 8]
    with torch.inference_mode():
        expected = baseline.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    text = baseline.tokenizer.decode(expected[0, len(ids):].tolist())
    whole = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert whole.choices[0].text == text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (4, 6)
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert sum(1 for c in chunks if c.choices) == 6 and chunks[-1].usage.completion_tokens == 6


def test_baseline_serves_one_request_at_a_time(baseline_url):
    url, baseline = baseline_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    seen, texts = [], []
    inner = baseline.generate

    def generate(*args, **kwargs):
        seen.append(baseline.model_lock.locked())     # taken by this very call: none overlapped it
        return inner(*args, **kwargs)
    baseline.generate = generate
    try:
        threads = [threading.Thread(target=lambda p=p: texts.append(client.completions.create(
            model="tiny", prompt=p, max_tokens=5, temperature=0).choices[0].text)) for p in ("a", "bb", "ccc")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        baseline.generate = inner
    assert len(texts) == 3 and seen == [True, True, True]
    assert json.loads(__import__("httpx").get(url + "/health").text) == {
        "status": "ok", "running": 0, "queued": 0, "free_slots": 1, "capacity": 1}


def test_llama_cpp_server_is_skipped_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sse_starlette" else real(name, *a))
    # the missing list names what this environment lacks besides (llama_cpp itself, on a machine without the peers extra)
    with pytest.raises(serve_peers.SkipEngine, match=r"pip install .*sse-starlette.*missing: [^)]*sse_starlette"):
        serve_peers.peer_server("llama.cpp", "preset:tiny-gpt2", 1, "tiny", None)


def test_one_run_loads_several_engines(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["serve", "preset:tiny-gpt2", "--engine", "memwise", "--engine", "transformers",
                 "--num-requests", "4", "--max-concurrency", "2", "--max-tokens", "5", "--max-batch", "2",
                 "--out", str(out)])
    assert code == 0
    table = (out / "engines.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines()
            if line.startswith("| memwise") or line.startswith("| transformers")}
    assert set(rows) == {"memwise", "transformers"}
    for cells in rows.values():
        assert cells[2].strip() == "4/4" and cells[4].strip() == "20"     # completed, output tokens
    for engine in ("memwise", "transformers"):
        assert json.loads((out / engine / "results.json").read_text())["summary"]["completed"] == 4


def test_engine_and_url_do_not_mix(capsys):
    assert main(["serve", "x", "--url", "http://127.0.0.1:9", "--engine", "llama.cpp"]) == 1
    assert "--engine starts servers here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "x", "--engine", "vllm"])
    assert e.value.code == 2
