"""The decoder families (gpt2, opt, phi, llama, mistral) against Hugging Face transformers on tiny checkpoints."""
import json

import pytest
import torch

import memwise
from memwise.checkpoint import CheckpointReader
from memwise.errors import CheckpointError, ConfigError, UnsupportedError
from memwise.models import decoder
from memwise.spec import read_config

from tiny_models import VOCAB, build, checkpoint_builder, one_thread, tiny_configs  # noqa: F401 (autouse)

transformers = pytest.importorskip("transformers")

FAMILIES = list(tiny_configs())
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (HF model, directory), built once per module and on first use."""
    return checkpoint_builder(tmp_path_factory)


def load_family(directory, dtype="float32"):
    spec = decoder.spec_from_config(read_config(directory), str(directory / "config.json"))
    return decoder.load(spec, CheckpointReader(directory), dtype, "cpu")


def padded_batch():
    """Three prompts of 12, 9 and 5 tokens, left-padded with token 0."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 12), generator=generator)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, :3] = False
    mask[2, :7] = False
    return ids.masked_fill(~mask, 0), mask


def hf_logits(hf, ids, mask=None):
    """HF's logits with the positions its generate() would use for a left-padded batch."""
    with torch.no_grad():
        if mask is None:
            return hf(ids).logits
        positions = (mask.long().cumsum(1) - 1).masked_fill(~mask, 0)
        return hf(ids, attention_mask=mask.long(), position_ids=positions).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_hf(saved, name):
    hf, directory = saved(name)
    model = load_family(directory)
    ids, _ = padded_batch()
    with torch.no_grad():
        got = model(ids, model.new_cache(3, 12))
    expected = hf_logits(hf, ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert expected.abs().max() > 0.5, "logits too small to tell a wrong model from a right one"
    assert max_diff(got, expected) < TOLERANCE


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_batch_matches_hf_on_real_positions(saved, name):
    hf, directory = saved(name)
    model = load_family(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        got = model(ids, model.new_cache(3, 12), mask)
    expected = hf_logits(hf, ids, mask)
    assert torch.isfinite(got).all()
    assert max_diff(got[mask], expected[mask]) < TOLERANCE


@pytest.mark.parametrize("name", ["gpt2", "opt-post", "phi", "llama3", "mistral"])
def test_cached_steps_match_one_full_pass(saved, name):
    """Prefill 4 tokens, then a 3-token chunk, then one token at a time: the cache must reproduce the
    logits of the whole padded sequence at once (mistral's 6-slot window is crossed on the way)."""
    hf, directory = saved(name)
    model = load_family(directory)
    ids, mask = padded_batch()
    cache = model.new_cache(3, 12)
    with torch.no_grad():
        parts = [model(ids[:, :4], cache, mask[:, :4]), model(ids[:, 4:7], cache, mask[:, 4:7])]
        parts += [model(ids[:, t:t + 1], cache, mask[:, t:t + 1]) for t in range(7, 12)]
    got = torch.cat(parts, dim=1)
    expected = hf_logits(hf, ids, mask)
    assert max_diff(got[mask], expected[mask]) < TOLERANCE


def test_last_only_gives_the_last_position(saved):
    _, directory = saved("llama")
    model = load_family(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        full = model(ids, model.new_cache(3, 12), mask)
        last = model(ids, model.new_cache(3, 12), mask, last_only=True)
    assert last.shape == (3, 1, VOCAB)
    assert max_diff(last[:, 0], full[:, -1]) < 1e-6


def test_rope_scaling_changes_the_model(saved):
    """The scaled-rope checkpoints would pass the parity tests vacuously if scaling did nothing."""
    _, directory = saved("llama-linear")
    scaled = load_family(directory)
    config = read_config(directory)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    plain = decoder.load(decoder.spec_from_config(config, "x"), CheckpointReader(directory), "float32", "cpu")
    ids, _ = padded_batch()
    with torch.no_grad():
        assert max_diff(scaled(ids), plain(ids)) > 1e-2


def test_dynamic_rope_beyond_max_positions_matches_hf(tmp_path):
    config = tiny_configs()["llama"]
    config.max_position_embeddings = 8
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    from tiny_models import randomize
    randomize(hf)
    hf.save_pretrained(tmp_path)
    model = load_family(tmp_path)
    ids, _ = padded_batch()     # 12 tokens > 8 positions: the frequencies are rescaled
    assert max_diff(model(ids), hf_logits(hf, ids)) < TOLERANCE


def hf_generate(hf, ids, mask, new_tokens=32):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask.long(), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_matches_hf(saved, name):
    hf, directory = saved(name)
    model = memwise.load(directory)
    ids, mask = padded_batch()
    prompt = ids[:1]
    got = model.generate(prompt, max_new_tokens=32, ignore_eos=True)
    assert torch.equal(got, hf_generate(hf, prompt, mask[:1]))


@pytest.mark.parametrize("name", ["gpt2", "opt-post", "phi", "llama", "mistral"])
def test_batched_left_padded_generation_equals_each_prompt_alone(saved, name):
    hf, directory = saved(name)
    model = memwise.load(directory)
    ids, mask = padded_batch()
    batched = model.generate(ids, max_new_tokens=32, attention_mask=mask, ignore_eos=True)
    assert torch.equal(batched, hf_generate(hf, ids, mask))
    for row in range(3):
        alone = model.generate(ids[row:row + 1, mask[row]], max_new_tokens=32, ignore_eos=True)
        assert torch.equal(batched[row, 12:], alone[0, -32:])


def test_sharded_safetensors(tmp_path):
    hf = build("llama", tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, _ = padded_batch()
    assert max_diff(load_family(tmp_path)(ids), hf_logits(hf, ids)) < TOLERANCE


@pytest.mark.parametrize("name", ["gpt2", "phi"])
def test_pytorch_bin(saved, tmp_path, name):
    hf, directory = saved(name)
    # transformers 5 writes only safetensors; a .bin is what older versions wrote: the state dict, pickled
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    ids, _ = padded_batch()
    assert max_diff(load_family(tmp_path)(ids), hf_logits(hf, ids)) < TOLERANCE


def rewrite(directory, tmp_path, rename=None, drop=(), replace=None, config_edit=None):
    """A copy of a checkpoint directory with tensors renamed, dropped or replaced and config.json edited."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(directory / "model.safetensors")
    tensors = {(rename(k) if rename else k): v for k, v in tensors.items() if k not in drop}
    tensors.update(replace or {})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("name, prefix", [("gpt2", "transformer."), ("opt", "model.")])
def test_checkpoints_without_the_outer_prefix(saved, tmp_path, name, prefix):
    """Hub gpt2 files name tensors "h.0..." and some OPT files "decoder.layers...": both load, extra buffers ignored."""
    hf, directory = saved(name)
    # old hub files also hold buffers that are not weights (gpt2's causal mask, rotary inv_freq)
    buffers = {"h.0.attn.bias": torch.ones(1, 1, 64, 64), "h.0.attn.masked_bias": torch.tensor(-1e4),
               "decoder.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    stripped = rewrite(directory, tmp_path, rename=lambda k: k.removeprefix(prefix), replace=buffers)
    assert not any(k.startswith(prefix) for k in CheckpointReader(stripped).names())
    ids, _ = padded_batch()
    assert max_diff(load_family(stripped)(ids), hf_logits(hf, ids)) < TOLERANCE


def test_hub_style_rope_config_equals_transformers5_style(saved, tmp_path):
    """Hub configs spell rope as top-level rope_theta / rope_scaling / partial_rotary_factor."""
    _, directory = saved("llama-linear")

    def hub_style(config):
        del config["rope_parameters"]
        config.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    old = decoder.spec_from_config(read_config(rewrite(directory, tmp_path, config_edit=hub_style)), "x")
    new = decoder.spec_from_config(read_config(directory), "x")
    assert old == new and new.rope_scaling == {"rope_type": "linear", "factor": 4.0}

    phi2_style = {"model_type": "phi", "vocab_size": 64, "hidden_size": 40, "num_attention_heads": 2,
                  "num_hidden_layers": 1, "intermediate_size": 64, "partial_rotary_factor": 0.4,
                  "rope_theta": 20000.0, "rope_scaling": None}
    spec = decoder.spec_from_config(phi2_style, "phi/config.json")
    assert (spec.head_dim, spec.rotary_dim, spec.rope_theta, spec.rope_scaling) == (20, 8, 20000.0, None)


def test_missing_tensor_is_named(saved, tmp_path):
    _, directory = saved("llama")
    name = "model.layers.1.self_attn.k_proj.weight"
    broken = rewrite(directory, tmp_path, drop={name})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is missing"):
        load_family(broken)


def test_wrong_shape_names_tensor_expected_and_found(saved, tmp_path):
    _, directory = saved("opt-post")
    name = "model.decoder.project_in.weight"
    broken = rewrite(directory, tmp_path, replace={name: torch.zeros(32, 15)})
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[32, 15\], expected \[32, 16\]"):
        load_family(broken)


def test_gpt2_conv1d_shape_error_names_the_stored_layout(saved, tmp_path):
    _, directory = saved("gpt2")
    name = "transformer.h.0.attn.c_attn.weight"
    broken = rewrite(directory, tmp_path, replace={name: torch.zeros(96, 32)})   # [out, in]: transposed wrongly
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[96, 32\], expected \[32, 96\]"):
        load_family(broken)


LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
         "intermediate_size": 64}


@pytest.mark.parametrize("edit, error, message", [
    ({"hidden_size": None}, ConfigError, r"llama/config.json: field 'hidden_size' is missing"),
    ({"num_attention_heads": "4"}, ConfigError, r"field 'num_attention_heads' should be int, found '4'"),
    ({"num_hidden_layers": 0}, ConfigError, r"field 'num_hidden_layers' should be a positive integer, found 0"),
    ({"num_key_value_heads": 3}, ConfigError, r"4 attention heads are not a multiple of 3 key/value heads"),
    ({"hidden_size": 30}, ConfigError, r"hidden size 30 is not divisible by 'num_attention_heads' = 4"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, UnsupportedError, r"rope type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, ConfigError, r"rope scaling: field 'factor' is missing"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}}, ConfigError,
     r"field 'high_freq_factor' is missing"),
    ({"rope_scaling": "linear"}, ConfigError, r"field 'rope_scaling' should be an object"),
    ({"hidden_act": "gelu_fast"}, UnsupportedError, r"hidden_act 'gelu_fast' is not supported"),
    ({"rms_norm_eps": "small"}, ConfigError, r"field 'rms_norm_eps' should be float"),
])
def test_malformed_config_fields(edit, error, message):
    config = {**LLAMA, **edit}
    with pytest.raises(error, match=message):
        decoder.spec_from_config(config, "llama/config.json")


@pytest.mark.parametrize("config, error, message", [
    ({**LLAMA, "model_type": "phi", "qk_layernorm": True}, UnsupportedError, r"qk_layernorm = true is not supported"),
    ({"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1, "vocab_size": 64},
     ConfigError, r"field 'n_positions' is missing"),
    ({"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1, "vocab_size": 64, "n_positions": 8,
      "scale_attn_by_inverse_layer_idx": True}, UnsupportedError, r"scale_attn_by_inverse_layer_idx"),
    ({"model_type": "opt", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 64,
      "max_position_embeddings": 8}, ConfigError, r"field 'ffn_dim' is missing"),
    ({"model_type": "mistral", **{k: v for k, v in LLAMA.items() if k != "model_type"}, "sliding_window": -1},
     ConfigError, r"field 'sliding_window' should be a positive integer or null"),
])
def test_family_specific_config_errors(config, error, message):
    with pytest.raises(error, match=message):
        decoder.spec_from_config(config, "m/config.json")


def test_config_error_through_load_names_the_file(saved, tmp_path):
    _, directory = saved("phi")
    broken = rewrite(directory, tmp_path, config_edit=lambda c: c.pop("intermediate_size"))
    with pytest.raises(ConfigError, match=rf"{tmp_path}/config.json: field 'intermediate_size' is missing"):
        memwise.load(broken)


def test_spec_fields_of_each_family(saved):
    specs = {name: decoder.spec_from_config(read_config(saved(name)[1]), "x") for name in ("gpt2", "opt-post", "phi", "mistral")}
    gpt2, opt, phi, mistral = specs.values()
    assert (gpt2.intermediate_size, gpt2.activation, gpt2.tie_word_embeddings, gpt2.positions) == \
        (128, "gelu_new", True, "learned")
    assert (opt.pre_norm, opt.final_norm, opt.embed_dim, opt.position_offset, opt.activation) == \
        (False, False, 16, 2, "relu")
    assert (phi.parallel_block, phi.rotary_dim, phi.lm_head_bias, phi.positions) == (True, 4, True, "rotary")
    assert (mistral.norm, mistral.gated_mlp, mistral.num_kv_heads, mistral.sliding_window) == ("rmsnorm", True, 2, 6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(saved, dtype):
    _, directory = saved("llama")
    full, half = load_family(directory), load_family(directory, dtype)
    assert half.embed.weight.dtype == getattr(torch, dtype)
    assert half.weights_bytes() * 2 == full.weights_bytes()
    ids, mask = padded_batch()
    with torch.no_grad():
        got = half(ids, half.new_cache(3, 12), mask)
        expected = full(ids, full.new_cache(3, 12), mask)
    assert got.dtype == torch.float32
    assert max_diff(got[mask], expected[mask]) < 0.1


def test_tied_embeddings_share_one_tensor(saved):
    for name in ("gpt2", "llama3"):
        model = load_family(saved(name)[1])
        assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_weight_sizes_and_synthetic(saved):
    spec = decoder.spec_from_config(read_config(saved("opt-post")[1]), "x")
    hf_count = sum(p.numel() for p in saved("opt-post")[0].parameters())
    sizes = decoder.weight_sizes(spec)
    # HF keeps opt's two unused position rows; memwise drops them at load
    assert sizes == {"float32": 4 * (hf_count - 2 * 32), "bfloat16": 2 * (hf_count - 2 * 32),
                     "float16": 2 * (hf_count - 2 * 32)}
    a, b = decoder.synthetic(spec, "float32", "cpu", seed=5), decoder.synthetic(spec, "bfloat16", "cpu", seed=5)
    assert a.spec.synthetic and a.weights_bytes() == sizes["float32"] and b.weights_bytes() == sizes["bfloat16"]
    assert torch.equal(a.layers[1].attn.qkv.weight.bfloat16(), b.layers[1].attn.qkv.weight)
    c = decoder.synthetic(spec, "float32", "cpu", seed=6)
    assert not torch.equal(a.embed.weight, c.embed.weight)
    ids, mask = padded_batch()
    assert torch.isfinite(a(ids, a.new_cache(3, 12), mask)).all()


def test_learned_positions_bound_the_cache(saved):
    model = load_family(saved("gpt2")[1])
    with pytest.raises(UnsupportedError, match=r"65 tokens .* exceed the model's 64 learned positions"):
        model.new_cache(1, 65)


def test_cuda_matches_cpu(saved):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, directory = saved("mistral")
    spec = decoder.spec_from_config(read_config(directory), "x")
    cpu = load_family(directory)
    ids, mask = padded_batch()
    for dtype, tolerance in (("float32", 1e-3), ("bfloat16", 0.1), ("float16", 0.05)):
        gpu = decoder.load(spec, CheckpointReader(directory), dtype, "cuda")
        with torch.no_grad():
            got = gpu(ids.cuda(), gpu.new_cache(3, 12), mask.cuda()).cpu()
            expected = cpu(ids, cpu.new_cache(3, 12), mask)
        assert max_diff(got[mask], expected[mask]) < tolerance
