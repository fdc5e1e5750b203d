"""memwise.lite, the torch-free runtime: the same logits and greedy tokens as memwise.load on packed
checkpoints, the decode step identical (the same C step), no torch in its process, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import memwise
import memwise.lite as lite
from memwise.convert import convert
from memwise.errors import CheckpointError, MemwiseError, SourceError, UnsupportedError
from memwise.lite import hgrn_forward

from hgrn_checkpoints import hgrn_config, write_hgrn_checkpoint
from reference_checks import assert_close

pytestmark = pytest.mark.skipif(not memwise.kernels.HAVE_C, reason="memwise.lite needs the C extensions")

# The float work between the products runs in numpy's rounding instead of torch's: the repo's
# tolerance for HGRN float work (tests/test_fused_step.py's STEP_REL), relative to the logits' spread.
REL = 1e-3
IDS = [[5, 17, 99, 200, 3, 45, 7, 120, 64, 33, 150], [9, 1, 150, 2, 77, 13, 8, 199, 0, 42, 180]]
CONFIGS = {
    "two-heads": hgrn_config(128, 3, 301, num_heads=2),
    "no-lower-bound": hgrn_config(96, 2, 203, intermediate_size=200, use_lower_bound=False),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def packed(request, tmp_path_factory):
    latent = tmp_path_factory.mktemp("latent")
    write_hgrn_checkpoint(latent, CONFIGS[request.param], seed=11)
    out = tmp_path_factory.mktemp("lite") / "packed"
    convert(str(latent), out, progress=False)
    return out


@pytest.fixture(scope="module")
def models(packed):
    return lite.load(packed, threads=2), memwise.load(str(packed))


def test_logits_match_the_torch_path(models):
    small, full = models
    got = small.logits(IDS)
    want = full.logits(torch.tensor(IDS))
    assert got.dtype == np.float32
    assert_close(torch.from_numpy(got), want, REL)


def test_greedy_tokens_are_identical(models):
    small, full = models
    got = small.generate(IDS, max_new_tokens=12, ignore_eos=True)
    want = full.generate(torch.tensor(IDS), max_new_tokens=12, ignore_eos=True)
    np.testing.assert_array_equal(got, want.numpy())


def test_decode_step_is_the_torch_paths_step(models):
    small, full = models
    # Same lower bounds (the one float input computed at load), then the same C step: identical logits.
    if full.module.lower_bounds is not None:
        np.testing.assert_allclose(small.weights.lower_bounds, full.module.lower_bounds.numpy(), rtol=1e-6, atol=1e-7)
        small.weights.lower_bounds[...] = full.module.lower_bounds.numpy()
    state = small.new_state(2)
    got = small.step(np.array([7, 190]), state)
    cache = full.module.new_cache(2)
    want = full.module(torch.tensor([[7], [190]]), cache)[:, 0]
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(state, cache.state.numpy())


def test_long_prompts_go_in_slices_with_the_same_logits(models, monkeypatch):
    small, _ = models
    whole = small.logits(IDS)
    monkeypatch.setattr(hgrn_forward, "SLICE_BYTES", 8 * small.spec.intermediate_size * 2 * 3)  # 3 rows a slice
    assert_close(torch.from_numpy(small.logits(IDS)), torch.from_numpy(whole), 1e-5)


def test_sampling_is_seeded_and_top_k_1_is_greedy(models):
    small, _ = models
    greedy = small.generate(IDS, 6, ignore_eos=True)
    assert np.array_equal(small.generate(IDS, 6, ignore_eos=True, do_sample=True, top_k=1, seed=3), greedy)
    a = small.generate(IDS, 6, ignore_eos=True, do_sample=True, temperature=5.0, top_p=0.9, seed=3)
    b = small.generate(IDS, 6, ignore_eos=True, do_sample=True, temperature=5.0, top_p=0.9, seed=3)
    np.testing.assert_array_equal(a, b)


def test_a_sequence_stops_at_eos(models):
    small, _ = models
    first = int(small.generate(IDS[:1], 1, ignore_eos=True)[0, -1])
    small.spec.eos_token_ids, saved = (first,), small.spec.eos_token_ids
    try:
        out = small.generate(IDS[:1], 8)
    finally:
        small.spec.eos_token_ids = saved
    assert out.shape == (1, len(IDS[0]) + 1) and out[0, -1] == first


def test_load_and_generate_import_no_torch(packed):
    script = ("import sys, memwise, memwise.lite\n"
              f"m = memwise.lite.load({str(packed)!r})\n"
              "out = m.generate([[1, 2, 3, 4]], max_new_tokens=4, ignore_eos=True)\n"
              "print(out.shape, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False", done.stdout


def test_presets_and_latent_checkpoints_are_refused(tmp_path):
    with pytest.raises(SourceError, match="preset"):
        lite.load("preset:tiny-mmfree")
    write_hgrn_checkpoint(tmp_path, CONFIGS["two-heads"], seed=1)
    with pytest.raises(CheckpointError, match="not a memwise packed checkpoint"):
        lite.load(tmp_path)


def test_other_families_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedError, match="model_type 'gpt2'"):
        lite.load(tmp_path)


def copy_of(packed: Path, into: Path) -> Path:
    into.mkdir()
    for name in ("config.json", "model.safetensors"):
        (into / name).write_bytes((packed / name).read_bytes())
    return into


def test_truncated_file_is_one_error(packed, tmp_path):
    broken = copy_of(packed, tmp_path / "cut")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor '.*' has data offsets"):
        lite.load(broken)


def test_invalid_codes_are_one_error(packed, tmp_path):
    broken = copy_of(packed, tmp_path / "codes")
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = np.frombuffer(bytes(data[:8]), dtype="<u8")
    header = json.loads(bytes(data[8:8 + length]))
    begin = 8 + int(length) + header["lm_head.weight.packed"]["data_offsets"][0]
    data[begin] = 0xFF      # code 3 four times
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="lm_head.weight.packed' holds the invalid 2-bit code 3"):
        lite.load(broken)


@pytest.mark.parametrize("ids, message", [([[1, 2], [3]], "different lengths"), ([[]], "tokens >= 1"),
                                          ([[1.5, 2.0]], "integer token ids"), ([[1, 10 ** 6]], r"token ids must be in")])
def test_bad_input_ids_are_one_error(models, ids, message):
    with pytest.raises(MemwiseError, match=message):
        models[0].generate(ids, 2)


def test_a_presets_packed_file_holds_the_presets_weights(tmp_path):
    from memwise.bench.lite_engine import packed_checkpoint

    path = packed_checkpoint("preset:tiny-mmfree", directory=tmp_path)
    assert packed_checkpoint("preset:tiny-mmfree", directory=tmp_path) == path    # cached
    small, full = lite.load(path), memwise.load("preset:tiny-mmfree")
    ids = [[72, 101, 108, 108, 111, 33]]
    np.testing.assert_array_equal(small.generate(ids, 8, ignore_eos=True),
                                  full.generate(torch.tensor(ids), max_new_tokens=8, ignore_eos=True).numpy())


def test_a_packed_checkpoint_is_used_where_it_is_and_a_latent_one_converted_once(packed, tmp_path):
    from memwise.bench.lite_engine import packed_checkpoint

    assert packed_checkpoint(str(packed), directory=tmp_path / "cache") == packed
    latent = tmp_path / "latent"
    write_hgrn_checkpoint(latent, CONFIGS["no-lower-bound"], seed=2)
    out = packed_checkpoint(str(latent), directory=tmp_path / "cache")
    assert out.parent.parent == tmp_path / "cache" and (out / "model.safetensors").is_file()
    assert packed_checkpoint(str(latent), directory=tmp_path / "cache") == out


@pytest.mark.parametrize("preset", ["preset:tiny-mmfree", "preset:tiny-bitnet"])
def test_bench_runs_a_lite_cell_without_torch(tmp_path, monkeypatch, preset):
    from memwise.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = main(["bench", "--model", preset, "--engine", "memwise-lite", "--runs", "1", "--warmup", "0",
                 "--prompt-tokens", "8", "--new-tokens", "4", "--out", str(tmp_path / "out")])
    assert code == 0
    (record,) = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert record["status"] == "ok" and record["engine"] == "memwise-lite", record["reason"]
    assert record["weights_format"] == "2-bit packed"
    assert record["engine_details"]["torch_in_process"] is False
    assert record["decode_tok_s"] > 0 and record["peak_rss_bytes"] > 0
    assert record["decode_tok_s"] > 0 and record["peak_rss_bytes"] > 0


def with_word_tokenizer(packed: Path, into: Path, vocab: int) -> Path:
    """A copy of the checkpoint with a tokenizer.json whose token i is the word w<i>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    copy_of(packed, into)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(into / "tokenizer.json"))
    return into


def test_command_line_streams_the_greedy_completion(models, packed, tmp_path):
    small = models[0]
    directory = with_word_tokenizer(packed, tmp_path / "words", small.spec.vocab_size)
    prompt = [5, 17, 99, 3]
    want = small.generate([prompt], 6, ignore_eos=True)[0, len(prompt):]
    done = subprocess.run([sys.executable, "-m", "memwise.lite", str(directory), "--prompt",
                           " ".join(f"w{i}" for i in prompt), "--max-new-tokens", "6", "--ignore-eos"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"w{i}" for i in want]
    assert "6 tokens" in done.stderr and "no torch" in done.stderr


def test_command_line_mistake_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "memwise.lite", str(tmp_path / "missing"), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "memwise.lite: error:" in done.stderr


def test_a_step_with_a_wrong_state_is_one_error(models):
    small = models[0]
    with pytest.raises(MemwiseError, match="state must be float32 C-contiguous"):
        small.step(np.array([1, 2]), small.new_state(1))
    with pytest.raises(MemwiseError, match="state must be float32"):
        small.step(np.array([1]), small.new_state(1).astype(np.float64))


def test_the_lite_suite_and_its_targets():
    from memwise.bench import targets
    from memwise.bench.suites import build_matrix

    cells = [(m, e, d) for m, e, d, *_ in build_matrix("lite").cells()]
    assert cells == [("mmfree-370m", "memwise", "float32"), ("mmfree-370m", "memwise-lite", "float32"),
                     ("preset:mmfree-370m-shapes", "llama.cpp", "tq2_0")]

    def record(model, engine, dtype, decode, prefill, peak_mib):
        return dict(model=model, engine=engine, batch_size=1, dtype=dtype, status="ok", decode_tok_s=decode,
                    prefill_tok_s=prefill, peak_rss_bytes=peak_mib * 2**20, load_peak_rss_bytes=2**20)

    records = [record("mmfree-370m", "memwise", "float32", 300.0, 880.0, 415),
               record("mmfree-370m", "memwise-lite", "float32", 290.0, 870.0, 166),
               record("mmfree-370m-shapes", "llama.cpp", "tq2_0", 90.0, 270.0, 332)]
    verdicts = {v.target.what: v for v in targets.evaluate(records, targets.SUITE_TARGETS["lite"])}
    lite_peak = verdicts["peak resident set: mmfree-370m on memwise-lite / mmfree-370m-shapes on llama.cpp (TQ2_0)"]
    assert lite_peak.measured() == "0.50x" and lite_peak.met is True
    torch_peak = verdicts["peak resident set: mmfree-370m on memwise / mmfree-370m-shapes on llama.cpp (TQ2_0)"]
    assert torch_peak.met is False and len(verdicts) == 6
