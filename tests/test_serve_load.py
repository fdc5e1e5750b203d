"""memwise bench serve: a load above capacity with disconnecting clients against a real server process."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from memwise.bench.cli import main as bench_main  # noqa: E402
from memwise.bench.serve_bench import _total_rate  # noqa: E402
from memwise.bench.serve_load import arrival_offsets, builtin_prompts, prompts_of_tokens, read_prompts  # noqa: E402
from memwise.bench.serve_report import percentiles, summarize  # noqa: E402
from memwise.errors import MemwiseError  # noqa: E402
from memwise.language_model import load_tokenizer_of  # noqa: E402
from memwise.tokenizer import ByteTokenizer  # noqa: E402


@pytest.mark.parametrize("model", ["preset:tiny-mmfree", "preset:tiny-gpt2"])
def test_every_request_is_accounted_and_nothing_leaks(model, tmp_path):
    # 4 slots and 40 queue places for 60 requests sent at once: some wait, some get 429, and 6
    # clients close their streams after a few tokens.
    code = bench_main(["serve", model, "--num-requests", "60", "--request-rate", "inf", "--max-tokens", "32",
                       "--max-batch", "4", "--max-queue", "40", "--disconnect-fraction", "0.1",
                       "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    summary, meta, requests = results["summary"], results["metadata"], results["requests"]
    assert code == 0
    assert len(requests) == 60 and {r["state"] for r in requests} <= {"completed", "cancelled", "rejected"}
    assert summary["completed"] + summary["cancelled"] + summary["rejected"] == 60 and summary["failed"] == 0
    assert summary["rejected"] > 0 and summary["completed"] > 0 and summary["cancelled"] > 0
    assert all(r["http_status"] == 429 for r in requests if r["state"] == "rejected")
    assert all(r["disconnect"] for r in requests if r["state"] == "cancelled")
    assert meta["health_polls"]["bad"] == 0 and meta["health_polls"]["ok"] > 0
    leak = meta["leak_check"]
    assert leak["ok"] is True
    assert leak["state"]["running"] == 0 and leak["state"]["queued"] == 0
    assert leak["state"]["free_slots"] == leak["state"]["capacity"] == 4
    assert meta["server"]["exit_code"] == 0 and meta["server"]["peak_rss_bytes"] > 0
    for r in requests:
        if r["state"] == "completed":
            assert r["ttft_s"] is not None and r["output_tokens"] >= 1
    assert (tmp_path / "results.md").read_text().startswith("# memwise bench serve")


def test_summary_counts_percentiles_and_goodput():
    def req(state, ttft=None, tpot=None, tokens=0, itl=(), start=0.0, e2e=None):
        return {"state": state, "ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e, "output_tokens": tokens,
                "itl_s": list(itl), "start_s": start}
    # decode spans [0.1, 1.1] and [0.8, 1.5]: 9 + 19 tokens over 1.4 s of decoding
    requests = [req("completed", 0.1, 0.01, 10, [0.01, 0.02], 0.0, 1.1), req("completed", 0.3, 0.05, 20, (), 0.5, 1.0),
                req("cancelled"), req("rejected"), req("failed")]
    s = summarize(requests, 2.0, slo_ttft_ms=200, slo_tpot_ms=None)
    assert (s["completed"], s["cancelled"], s["rejected"], s["failed"]) == (2, 1, 1, 1) and s["accounted"]
    assert s["output_tokens"] == 30 and s["output_throughput"] == 15.0 and s["request_throughput"] == 1.0
    assert s["good_requests"] == 1 and s["goodput"] == 0.5
    assert s["decode_throughput"] == pytest.approx(28 / 1.4)
    assert percentiles([1.0, 2.0, 3.0])["p50"] == 2.0 and percentiles([0.0, 10.0])["p90"] == pytest.approx(9.0)
    assert percentiles([])["p99"] is None


def test_arrivals_and_prompts_are_deterministic(tmp_path):
    assert arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    poisson = arrival_offsets(200, 50.0, 1)
    assert poisson == arrival_offsets(200, 50.0, 1) and poisson == sorted(poisson)
    assert 2.0 < poisson[-1] < 6.0          # 200 arrivals at 50/s: about 4 s
    assert builtin_prompts(5, 3) == builtin_prompts(5, 3) != builtin_prompts(5, 4)
    good = tmp_path / "p.jsonl"
    good.write_text('"one"\n{"prompt": "two"}\n\n')
    assert read_prompts(good) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(MemwiseError, match="bad.jsonl:1"):
        read_prompts(bad)


def test_bad_flags_exit_non_zero(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["serve", "preset:tiny-mmfree", "--disconnect-fraction", "2"])
    assert e.value.code == 2
    assert bench_main(["serve", "x", "--url", "http://127.0.0.1:9", "--offline-reference"]) == 1
    assert "--offline-reference" in capsys.readouterr().err
    assert bench_main(["serve", "x", "--url", "http://127.0.0.1:9"]) == 1


def _word_tokens(text: str) -> list[int]:
    """A stand-in subword vocabulary: a start token, then one id per word and one per 5 letters beyond."""
    return [1] + [len(w) for w in text.split() for _ in range(1 + len(w) // 6)]


def test_prompt_tokens_sizes_prompts_by_the_tokenizer():
    encode = ByteTokenizer(256).encode
    for tokens in (1, 16, 64):
        prompts = prompts_of_tokens(20, tokens, encode, seed=2)
        assert [len(encode(p)) for p in prompts] == [tokens] * 20
        assert prompts == prompts_of_tokens(20, tokens, encode, seed=2) != prompts_of_tokens(20, tokens, encode, 3)
    # a coarser tokenizer: the longest prefix within the limit, never over it
    prompts = prompts_of_tokens(30, 9, _word_tokens)
    assert all(len(_word_tokens(p)) <= 9 for p in prompts) and max(len(_word_tokens(p)) for p in prompts) == 9
    assert sum(len(p) for p in prompts) > 30 * 9 * 3      # words, about five letters a token
    with pytest.raises(MemwiseError, match="--prompt-tokens 1: too few"):
        prompts_of_tokens(1, 1, _word_tokens)       # the start token alone fills it
    with pytest.raises(MemwiseError, match="an empty prompt is already 2 tokens"):
        prompts_of_tokens(1, 1, lambda text: [1, 2] + _word_tokens(text)[1:])   # start and end tokens


def test_prompt_tokens_counts_with_the_served_models_tokenizer(tmp_path, capsys):
    assert isinstance(load_tokenizer_of("preset:tiny-mmfree"), ByteTokenizer)
    code = bench_main(["serve", "preset:tiny-mmfree", "--prompt-tokens", "12", "--num-requests", "4",
                       "--max-concurrency", "2", "--max-tokens", "3", "--max-batch", "2", "--out", str(tmp_path)])
    requests = json.loads((tmp_path / "results.json").read_text())["requests"]
    assert code == 0 and [r["prompt_tokens"] for r in requests] == [12] * 4
    assert bench_main(["serve", "preset:tiny-mmfree", "--prompt-tokens", "8", "--prompts-file", "p.jsonl"]) == 1
    assert "not both" in capsys.readouterr().err
    assert bench_main(["serve", "x", "--url", "http://127.0.0.1:9", "--prompt-tokens", "8"]) == 1
    assert "--prompt-tokens counts with MODEL's tokenizer" in capsys.readouterr().err


def test_offline_reference_decodes_as_many_tokens_as_the_load(tmp_path):
    # 8 completed requests at batch 2: 4 offline runs; its rates are the work over the summed times
    code = bench_main(["serve", "preset:tiny-mmfree", "--num-requests", "8", "--max-concurrency", "2",
                       "--max-tokens", "4", "--max-batch", "2", "--offline-reference", "--out", str(tmp_path)])
    ref = json.loads((tmp_path / "results.json").read_text())["metadata"]["offline_reference"]
    assert code == 0 and ref["status"] == "ok" and ref["runs"] == 4
    assert ref["decode_tok_s_min"] <= ref["decode_tok_s"] <= ref["decode_tok_s_max"]
    assert ref["output_tok_s"] == pytest.approx(2 * 4 / ref["e2e_s"])
    assert "4 runs: decode" in (tmp_path / "results.md").read_text()
    assert _total_rate([1.0, 2.0, None]) == pytest.approx(4 / 3) and _total_rate([]) is None
