"""memwise serve --ray: two Ray Serve replicas of a tiny model on a local Ray instance share one load."""
from __future__ import annotations

import pytest

pytest.importorskip("uvicorn")
ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'memwise[serve-ray]')")
pytest.importorskip("ray.serve", reason="ray is installed without Serve (pip install 'ray[serve]')")

import time  # noqa: E402

import httpx  # noqa: E402

from memwise.bench.serve_launch import LaunchedServer  # noqa: E402
from memwise.bench.serve_load import LoadConfig, builtin_prompts, leak_check, run_load  # noqa: E402


def replicas_seen(url: str, limit_s: float = 120.0) -> set[str]:
    """Replica ids of small concurrent batches of requests, until two have answered (Ray's router
    may learn of the second replica a moment after the first answers)."""
    seen: set[str] = set()
    deadline = time.monotonic() + limit_s
    with httpx.Client(timeout=60) as client:
        while len(seen) < 2 and time.monotonic() < deadline:
            r = client.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200
            seen.add(r.headers["x-memwise-replica"])
            time.sleep(0.2)
    return seen


def test_two_replicas_serve_one_load_test():
    with LaunchedServer("preset:tiny-mmfree", "tiny", ["--ray", "--replicas", "2", "--max-batch", "4"]) as server:
        assert len(replicas_seen(server.url)) == 2
        config = LoadConfig(url=server.url, model="tiny", num_requests=40, max_concurrency=12, max_tokens=16)
        results, _, health = run_load(config, builtin_prompts(40))
        assert [r.state for r in results] == ["completed"] * 40, [r.error for r in results if r.error][:3]
        assert all(r.output_tokens == 16 for r in results)
        replicas = {r.replica for r in results}
        assert len(replicas) == 2 and None not in replicas
        assert health["bad"] == 0
        assert leak_check(server.url)["ok"] is True
        assert server.stop() == 0
