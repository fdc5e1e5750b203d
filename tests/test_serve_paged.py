"""memwise serve on decoders: one batched step over a paged KV cache, blocks that come back."""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import memwise  # noqa: E402
from memwise.serve.paged_batch import PagedDecoders  # noqa: E402

from test_serve import serve, submit_all, tiny, until  # noqa: E402,F401 (fixtures)

PROMPTS, LENGTHS = [[5, 6, 7], [100, 3, 4, 5, 6], [9] * 11, [40, 41], [7] * 30], [9, 4, 13, 20, 6]


@pytest.mark.parametrize("preset,kv_cache", [("preset:tiny-gpt2", None), ("preset:tiny-llama", None),
                                             ("preset:tiny-llama", "int8")])
def test_decoders_batch_over_paged_blocks_and_match_alone(serve, preset, kv_cache):
    model = memwise.load(preset, kv_cache=kv_cache)
    alone = [model.generate([ids], n, ignore_eos=True)[0, len(ids):].tolist() for ids, n in zip(PROMPTS, LENGTHS)]
    running = serve(model, max_batch=3)
    engine = running.engine
    assert isinstance(engine.batch, PagedDecoders)
    sequences = submit_all(running, model, PROMPTS, LENGTHS)
    assert [s.generated for s in sequences] == alone
    assert max(running.gate.batches) == 3          # decode steps ran the running sequences as one batch
    until(lambda: engine.free_slots == 3, "the slots come back")
    free, usable = engine.kv_blocks
    assert free == usable                          # every block is back on the free list


def test_a_short_pool_makes_newcomers_wait_not_fail(serve):
    """With blocks for about two sequences, five still all finish, in turn, with their own tokens."""
    model = memwise.load("preset:tiny-gpt2")
    alone = [model.generate([ids], n, ignore_eos=True)[0, len(ids):].tolist() for ids, n in zip(PROMPTS, LENGTHS)]
    running = serve(model, max_batch=4)
    engine = running.engine
    engine.batch = PagedDecoders(model, 4, num_blocks=10, block_size=4)    # 9 usable: the longest needs 9
    sequences = submit_all(running, model, PROMPTS, LENGTHS)
    assert [s.generated for s in sequences] == alone
    assert engine.kv_blocks == (9, 9)


def test_a_request_larger_than_the_pool_is_refused_alone(serve):
    model = memwise.load("preset:tiny-gpt2")
    running = serve(model, max_batch=2)
    engine = running.engine
    engine.batch = PagedDecoders(model, 2, num_blocks=3, block_size=4)    # 2 usable blocks: 8 tokens
    big, small = submit_all(running, model, [[5] * 6, [5, 6]], [4, 3])
    assert big.finish_reason == "error" and small.finish_reason == "length"
    assert engine.kv_blocks == (2, 2)


def test_disconnect_returns_the_blocks_and_health_reports_them(serve):
    model = memwise.load("preset:tiny-gpt2")
    running = serve(model, max_batch=2)
    engine = running.engine
    running.gate.delay = 0.02
    with httpx.Client(base_url=running.url) as http:
        with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "hello there",
                                                          "max_tokens": 200, "stream": True}) as response:
            for _ in zip(range(3), response.iter_lines()):
                pass
            assert engine.kv_blocks[0] < engine.kv_blocks[1]      # the sequence holds blocks
        until(lambda: engine.running == 0, "the engine drops the disconnected sequence")
        health = http.get("/health").json()
        metrics = http.get("/metrics").text
    assert health["free_kv_blocks"] == health["kv_blocks"] == engine.kv_blocks[1]
    assert "memwise_kv_free_blocks" in metrics and "memwise_kv_used_blocks 0.0" in metrics
