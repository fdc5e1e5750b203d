"""memwise.lite on BitNet b1.58: the same logits and greedy tokens as memwise.load on packed checkpoints
(microsoft's bitnet flavour, untied, and 1bitLLM's Llama-shaped flavour, tied with no lm_head), the
decode step the torch path's fused step (the same C code: identical caches), no torch in its process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import memwise
import memwise.lite as lite
from memwise.convert import convert
from memwise.errors import MemwiseError
from memwise.lite.bitnet_model import BitNetLiteModel
from memwise.models.bitnet import fused_step

from reference_checks import assert_close
from tiny_models import randomize

pytestmark = pytest.mark.skipif(not fused_step.available(), reason="memwise.lite needs the C extensions")

# The float work outside the C step (final RMSNorm, rotary frequencies) is numpy's rounding, not
# torch's; the torch path's prefill runs its modules, whose float order differs from the C step's:
# the repo's tolerance for that (tests/test_bitnet_fused.py's STEP_REL), relative to the logits' spread.
REL = 1e-3
IDS = [[5, 17, 90, 64, 3, 45, 7, 88, 64, 33, 21]]
SIZES = dict(vocab_size=96, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=3,
             num_key_value_heads=1, max_position_embeddings=64)


def bitnet_checkpoint(path: Path) -> Path:
    """transformers' BitNetForCausalLM (relu^2, untied), random, saved latent."""
    import transformers
    config = transformers.BitNetConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **SIZES)
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(config).eval()
    randomize(model)
    model.save_pretrained(path)
    return path


def one_bit_llm_checkpoint(path: Path, latent: Path) -> Path:
    """1bitLLM's layout: model_type llama + BitnetForCausalLM, silu, sub-norms named inner_attn_ln and
    ffn_layernorm, no lm_head (the output is the embedding) whatever tie_word_embeddings says."""
    path.mkdir()
    renames = {"self_attn.attn_sub_norm": "self_attn.inner_attn_ln", "mlp.ffn_sub_norm": "mlp.ffn_layernorm"}
    tensors = {}
    for name, value in load_file(latent / "model.safetensors").items():
        for old, new in renames.items():
            name = name.replace(old, new)
        if name != "lm_head.weight":
            tensors[name] = value.contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "llama", "architectures": ["BitnetForCausalLM"], "hidden_act": "silu",
              "weight_bits": 1, "input_bits": 8, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False, **SIZES}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=["bitnet", "1bitllm"])
def packed(request, tmp_path_factory):
    latent = bitnet_checkpoint(tmp_path_factory.mktemp("bitnet"))
    if request.param == "1bitllm":
        latent = one_bit_llm_checkpoint(tmp_path_factory.mktemp("llama") / "latent", latent)
    out = tmp_path_factory.mktemp("lite") / "packed"
    convert(str(latent), out, progress=False)
    return out


@pytest.fixture(scope="module")
def models(packed):
    small = lite.load(packed, threads=2)
    assert isinstance(small, BitNetLiteModel)
    return small, memwise.load(str(packed))


def test_the_flavour_is_read_from_the_config(models, packed):
    small, full = models
    # convert writes a checkpoint without an lm_head as tied
    assert json.loads((packed / "config.json").read_text())["tie_word_embeddings"] == (small.spec.model_type == "llama")
    assert small.spec == full.spec
    assert small.spec.tie_word_embeddings == (small.spec.model_type == "llama")
    assert small.weights_bytes() == full.module.weights_bytes()


def test_logits_match_the_torch_path(models):
    small, full = models
    got = small.logits(IDS)
    assert got.dtype == np.float32 and got.shape == (1, len(IDS[0]), small.spec.vocab_size)
    assert_close(torch.from_numpy(got), full.logits(torch.tensor(IDS)), REL)


def test_greedy_tokens_are_identical(models):
    small, full = models
    got = small.generate(IDS, max_new_tokens=12, ignore_eos=True)
    want = full.generate(torch.tensor(IDS), max_new_tokens=12, ignore_eos=True)
    assert len(set(got[0, len(IDS[0]):].tolist())) > 1      # not a degenerate model
    np.testing.assert_array_equal(got, want.numpy())


def test_decode_steps_are_the_torch_paths_fused_steps(models):
    small, full = models
    module = full.module
    # The one float input computed at load (rotary frequencies) taken from the torch path: then the
    # same C step on the same inputs writes identical keys and values, token after token.
    saved = small.weights.inv_freq.copy()
    small.weights.inv_freq[...] = module.inv_freq.numpy()
    try:
        state = small.new_state(1, 8)
        cache = module.new_cache(1, 8)
        for token in (7, 60, 3, 91):
            got = small.step(np.array([token]), state)
            want = module(torch.tensor([[token]]), cache)[:, 0]
            assert module._fused_decoder is not None       # the torch path's step was the fused one
            assert_close(torch.from_numpy(got), want, 1e-5)
        assert state.length == cache.length == 4
        for n in range(small.spec.num_layers):     # the slots written (the torch cache's others are not zeroed)
            np.testing.assert_array_equal(state.keys[n][:, :4], cache.keys[n][0, :, :4].numpy())
            np.testing.assert_array_equal(state.values[n][:, :4], cache.values[n][0, :, :4].numpy())
    finally:
        small.weights.inv_freq[...] = saved


def token_by_token(small, ids, state):
    """Logits [T, V] of ids through the fused decode step one token at a time (the prefill before bitnet_forward)."""
    return np.stack([small.step(np.array([token]), state)[0] for token in ids])


def test_prefill_matches_the_fused_step_token_by_token(models):
    small, _ = models
    stepped_state = small.new_state(1, 16)
    stepped = token_by_token(small, IDS[0], stepped_state)
    state = small.new_state(1, 16)
    got = small._prefill(np.array(IDS), state, last_only=False)[0]
    assert_close(torch.from_numpy(got), torch.from_numpy(stepped), REL)
    np.testing.assert_array_equal(got.argmax(-1), stepped.argmax(-1))
    assert state.length == stepped_state.length == len(IDS[0])
    for n in range(small.spec.num_layers):      # the cache the fused step reads next, in its layout
        pairs = ((state.keys[n], stepped_state.keys[n]), (state.values[n], stepped_state.values[n]))
        for got_slots, want_slots in pairs:
            spread = float(np.abs(want_slots).max())
            np.testing.assert_allclose(got_slots, want_slots, rtol=0, atol=REL * spread)
    last = small._prefill(np.array(IDS), small.new_state(1, 16), last_only=True)
    assert last.shape == (1, 1, small.spec.vocab_size)
    assert_close(torch.from_numpy(last[0]), torch.from_numpy(got[-1:]), 1e-5)


def test_decode_after_the_prefill_continues_the_torch_paths_logits(models):
    small, full = models
    state = small.new_state(1, 16)
    head = small._prefill(np.array([IDS[0][:6]]), state, last_only=True)[0]
    rest = token_by_token(small, IDS[0][6:], state)
    want = full.logits(torch.tensor(IDS))[0, 5:]
    assert_close(torch.from_numpy(np.concatenate([head, rest])), want, REL)


def test_prompt_slices_give_the_same_logits(models, monkeypatch):
    from memwise.lite import bitnet_forward

    small, _ = models
    whole = small.logits(IDS)
    # 3 prompt tokens per slice: the later slices attend over the cache the earlier ones wrote
    monkeypatch.setattr(bitnet_forward, "SLICE_BYTES", 3 * 8 * small.spec.intermediate_size)
    assert small._forward.slice_rows() == 3
    sliced = small.logits(IDS)
    assert_close(torch.from_numpy(sliced), torch.from_numpy(whole), 1e-5)
    np.testing.assert_array_equal(sliced.argmax(-1), whole.argmax(-1))


def attention_reference(q, keys, values, start):
    """Causal softmax attention in float64: q [T, heads, d] at positions start.., keys/values [kv_heads, S, d]."""
    length, heads, d = q.shape
    group = heads // keys.shape[0]
    out = np.empty((length, heads, d))
    for h in range(heads):
        for r in range(length):
            seen = start + r + 1
            scores = keys[h // group, :seen].astype(np.float64) @ q[r, h] / np.sqrt(d)
            weights = np.exp(scores - scores.max())
            out[r, h] = weights @ values[h // group, :seen] / weights.sum()
    return out.reshape(length, heads * d)


@pytest.mark.parametrize("isa", ["avx512vnni", "avx2", "scalar"])
@pytest.mark.parametrize("threads", [1, 3])
def test_prefill_attention_is_causal_softmax_attention(models, isa, threads):
    from memwise import kernels

    if isa not in kernels._machine_isas():
        pytest.skip(f"no {isa} here")
    forward = models[0]._forward
    rng = np.random.default_rng(1)
    start, length, heads, kv_heads, d, slots = 4, 7, 6, 2, 21, 13     # odd sizes; slots past 11 unwritten
    q = rng.standard_normal((length, heads, d), dtype=np.float32)
    keys = rng.standard_normal((kv_heads, slots, d), dtype=np.float32)
    values = rng.standard_normal((kv_heads, slots, d), dtype=np.float32)
    keys[:, start + length:] = values[:, start + length:] = np.nan     # a read past the causal end shows
    saved = forward.isa_id, forward.threads
    forward.isa_id, forward.threads = kernels.isa_id(isa), threads
    try:
        got = forward.attention(q, keys, values, start)
    finally:
        forward.isa_id, forward.threads = saved
    np.testing.assert_allclose(got, attention_reference(q, keys, values, start), rtol=0, atol=1e-5)


def test_a_prompt_longer_than_the_cache_is_one_error(models):
    small, _ = models
    with pytest.raises(MemwiseError, match="KV cache is full"):
        small._prefill(np.array(IDS), small.new_state(1, 4), last_only=True)


def test_rotary_frequencies_are_the_torch_paths_to_rounding(models):
    small, full = models
    np.testing.assert_allclose(small.weights.inv_freq, full.module.inv_freq.numpy(), rtol=1e-6)


def test_a_batch_and_a_too_long_generation_are_one_error(models):
    small, _ = models
    with pytest.raises(MemwiseError, match="one sequence at a time"):
        small.generate([IDS[0], IDS[0]], 2)
    with pytest.raises(MemwiseError, match="positions"):
        small.generate(IDS, small.spec.max_positions)


def test_load_and_generate_import_no_torch(packed):
    script = ("import sys, memwise, memwise.lite\n"
              f"m = memwise.lite.load({str(packed)!r})\n"
              "out = m.generate([[1, 2, 3, 4]], max_new_tokens=4, ignore_eos=True)\n"
              "print(out.shape, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False", done.stdout


def test_command_line_streams_the_greedy_completion(models, packed, tmp_path):
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers

    small = models[0]
    directory = tmp_path / "words"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).symlink_to(packed / name)
    words = Tokenizer(tokenizer_models.WordLevel({f"w{i}": i for i in range(small.spec.vocab_size)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(directory / "tokenizer.json"))
    prompt = IDS[0][:5]
    want = small.generate([prompt], 6, ignore_eos=True)[0, len(prompt):]
    done = subprocess.run([sys.executable, "-m", "memwise.lite", str(directory), "--prompt",
                           " ".join(f"w{i}" for i in prompt), "--max-new-tokens", "6", "--ignore-eos"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"w{i}" for i in want]
    assert "6 tokens" in done.stderr and "no torch" in done.stderr




def test_a_presets_packed_file_holds_the_presets_weights(tmp_path):
    from memwise.bench.lite_engine import packed_checkpoint

    path = packed_checkpoint("preset:tiny-bitnet", directory=tmp_path)
    small, full = lite.load(path), memwise.load("preset:tiny-bitnet")
    ids = [[3, 100, 7, 250, 9]]
    assert_close(torch.from_numpy(small.logits(ids)), full.logits(torch.tensor(ids)), REL)
