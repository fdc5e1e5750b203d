"""eval-quant's metrics, the reference model's training script, and the command's contract."""
from __future__ import annotations

import json
import math

import pytest
import torch

from memwise.cli import main
from memwise.quality.compare import compare


def test_metrics_of_known_distributions():
    ids = torch.tensor([[0, 1, 0]])
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    same = compare(p, p.clone(), ids, "same")
    assert same.kl_mean == 0 and same.top1_agreement == 1 and same.perplexity == same.perplexity_float32
    q = torch.log(torch.tensor([[[0.5, 0.5], [0.6, 0.4], [0.8, 0.2]]]))
    result = compare(p, q, ids, "q")
    kl = [0.0, 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4), 0.2 * math.log(0.2 / 0.8) + 0.8 * math.log(0.8 / 0.2)]
    assert result.kl_mean == pytest.approx(sum(kl) / 3, rel=1e-5)
    # argmax of [0.5, 0.5] is 0 in both; position 2 disagrees
    assert result.top1_agreement == pytest.approx(2 / 3)
    # next-token targets 1 then 0, read at positions 0 and 1
    assert result.perplexity_float32 == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.9)) / 2))
    assert result.perplexity == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.6)) / 2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The training script for a few seconds: a checkpoint memwise loads like any gpt2 directory."""
    from memwise.quality.train import train

    out = tmp_path_factory.mktemp("trained")
    log = train(out, minutes=0.05, threads=1)
    assert log["steps"] >= 1 and log["losses"][0] > 0
    return out


def test_trained_checkpoint_matches_transformers(trained):
    import transformers

    import memwise

    ids = torch.tensor([list(b"def main():\n    return 0\n")])
    want = transformers.GPT2LMHeadModel.from_pretrained(trained).eval()(ids).logits
    got = memwise.load(str(trained)).logits(ids)
    assert (got - want).abs().max() <= 1e-4


def test_eval_quant_json(trained, capsys):
    assert main(["eval-quant", str(trained), "--tokens", "600", "--quantize", "int8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (result,) = out["results"]
    assert result["scheme"] == "int8" and result["positions"] == 2 * 256     # whole windows of 256
    assert 0 <= result["kl_mean"] < 0.05 and result["top1_agreement"] > 0.9
    assert result["perplexity"] == pytest.approx(result["perplexity_float32"], rel=0.05)


def test_eval_quant_kv_cache_rows(trained, capsys):
    assert main(["eval-quant", str(trained), "--tokens", "300", "--kv-cache", "int8", "--kv-cache", "int4",
                 "--json"]) == 0
    int8, int4 = json.loads(capsys.readouterr().out)["results"]
    assert (int8["scheme"], int4["scheme"]) == ("kv-int8", "kv-int4")
    # a quantized cache moves the distributions (KL > 0), and int4 moves them more than int8
    assert 0 < int8["kl_mean"] < int4["kl_mean"] < 0.5 and int8["top1_agreement"] > 0.9
    assert int8["perplexity_float32"] == int4["perplexity_float32"]


def test_eval_quant_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["eval-quant"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python -m memwise.quality.train" in err[0]
    assert main(["eval-quant", "preset:tiny-gpt2", "--tokens", "0"]) == 1
    assert "--tokens must be positive" in capsys.readouterr().err
    assert main(["eval-quant", "preset:tiny-gpt2", "--quantize", "bogus", "--tokens", "256"]) == 1
    assert "bogus" in capsys.readouterr().err
    assert main(["eval-quant", "preset:tiny-gpt2", "--kv-cache", "int3", "--tokens", "256"]) == 1
    assert "unknown KV cache scheme 'int3'" in capsys.readouterr().err
