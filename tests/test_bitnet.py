"""BitNet b1.58 (model_type bitnet): memwise's packed model against transformers' BitNetForCausalLM with
AutoBitLinear projections, on tiny checkpoints that transformers writes; the packed forms; bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import memwise
from memwise import kernels
from memwise.convert import convert
from memwise.errors import CheckpointError, ConfigError, MemwiseError, UnsupportedError
from memwise.kernels.packed import ternary_matmul_reference, unpack_ternary
from memwise.models import bitnet
from memwise.models.ternary import ternarize
from memwise.presets import preset_config

from reference_checks import BITLINEAR_REL, assert_close
from tiny_models import randomize

TINY = {
    "untied": dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2),
    # rows that are not a multiple of 128 wide (padded codes), one key/value head, a tied lm_head
    "tied-odd": dict(vocab_size=96, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                     num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True),
}


def transformers_reference(model):
    """`model` with transformers' online AutoBitLinear on every projection, as from_pretrained makes it
    for a bitnet quantization_config (the lm_head stays an nn.Linear)."""
    from transformers.integrations.bitnet import replace_with_bitnet_linear
    from transformers.utils.quantization_config import BitNetQuantConfig
    state = model.state_dict()
    quant = BitNetQuantConfig(linear_class="autobitlinear", quantization_mode="online")
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quant)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.eval()


def run_reference(model, ids, mask=None):
    # transformers compiles its quantizers with torch.compile; eager gives the same values without a compiler
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        return model(ids, attention_mask=mask).logits.float()


def save_tiny(name, tmp_path_factory):
    import transformers
    path = tmp_path_factory.mktemp(name)
    config = transformers.BitNetConfig(max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                       **TINY[name])
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(config).eval()
    randomize(model)
    model.save_pretrained(path)
    return path, transformers_reference(model)


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """The bad-config messages below name this checkpoint's sizes."""
    return save_tiny("untied", tmp_path_factory)


def load(path, backend="reference"):
    model = memwise.load(str(path))
    model.module.backend = backend
    return model


def ids_for(vocab, shape=(2, 9), seed=0):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---- against transformers ----------------------------------------------------------------------

def test_logits_match_transformers(tiny):
    path, reference = tiny
    ids = ids_for(reference.config.vocab_size)
    want = run_reference(reference, ids)
    got = load(path).logits(ids)
    diff = float((got - want).abs().max() / (want.max() - want.min()))
    print(f"largest difference / logit spread: {diff:.2e}")
    assert diff < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_c_kernels_match_transformers(tiny):
    path, reference = tiny
    ids = ids_for(reference.config.vocab_size, seed=1)
    want = run_reference(reference, ids)
    got = load(path, "auto").logits(ids)
    assert_close(got, want, BITLINEAR_REL)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_greedy_tokens_match_transformers(tiny):
    path, reference = tiny
    ids = ids_for(reference.config.vocab_size, (1, 5), seed=2)
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        want = reference.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    got = load(path, "auto").generate(ids, max_new_tokens=12, ignore_eos=True)
    assert torch.equal(got, want)


def test_left_padded_batch_equals_prompts_alone(tiny):
    path, reference = tiny
    model = load(path)
    short, long = ids_for(96, (1, 4), seed=3), ids_for(96, (1, 7), seed=4)
    batch = torch.cat([torch.cat([torch.zeros((1, 3), dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[0, :3] = False
    got = model.logits(batch, mask)
    assert_close(got[0, 3:], model.logits(short)[0], 1e-5)
    assert_close(got[1], model.logits(long)[0], 1e-5)
    assert_close(got[0, 3:], run_reference(reference, batch, mask.long())[0, 3:], 1e-4)


def test_prefill_then_decode_equals_full_forward(tiny):
    path, _ = tiny
    module = load(path).module
    ids = ids_for(96, (2, 8), seed=5)
    full = module(ids)
    cache = module.new_cache(2, 8)
    steps = [module(ids[:, :5], cache)] + [module(ids[:, t:t + 1], cache) for t in range(5, 8)]
    assert_close(torch.cat(steps, dim=1), full, 1e-5)


# ---- integer arithmetic ------------------------------------------------------------------------

def test_stacked_product_is_the_matrices_products(tiny):
    """q, k and v share one product over their stacked codes: bit for bit each matrix's own."""
    path, _ = tiny
    qkv = load(path).module.layers[0].attn.qkv
    q, _ = kernels.quantize_rows(torch.randn(5, qkv.cols), qkv.norm_weight, qkv.eps)
    for backend in ("c", "reference") if kernels.HAVE_C else ("reference",):
        got = kernels.ternary_matmul(q, qkv.weight(), backend=backend)
        want = torch.cat([ternary_matmul_reference(q, qkv.weight(i).ternary()) for i in range(3)], dim=1)
        assert torch.equal(got, want)


def test_loaded_codes_are_the_latent_quantized_once(tiny):
    path, _ = tiny
    latent = load_file(path / "model.safetensors")
    down = load(path).module.layers[1].mlp.down.weight(0)
    want = ternarize(latent["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(down.packed, want.packed) and down.scale == want.scale


# ---- packed forms ------------------------------------------------------------------------------

def test_packed_round_trip_is_identical(tiny, tmp_path):
    path, _ = tiny
    out = convert(path, tmp_path / "packed", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["memwise"]["format"] == "memwise-ternary" and "quantization_config" not in config
    ids = ids_for(96, seed=6)
    for backend in ("reference", "auto"):
        assert torch.equal(load(out, backend).logits(ids), load(path, backend).logits(ids))
    again = convert(out, tmp_path / "again", progress=False)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    stored = load_file(out / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj.weight.packed"].dtype == torch.uint8
    assert "model.layers.0.mlp.up_proj.weight" not in stored


def write_transformers_packed(path, out, scale_dtype=torch.float32):
    """The latent checkpoint at `path` in transformers' offline packed form (as the 2B-4T release)."""
    from transformers.integrations.bitnet import pack_weights
    tensors = load_file(path / "model.safetensors")
    packed = {}
    for name, value in tensors.items():
        if "_proj" in name:
            matrix = ternarize(value)
            packed[name] = pack_weights(unpack_ternary(matrix.packed, matrix.cols).clone())
            packed[name + "_scale"] = torch.tensor([matrix.scale], dtype=scale_dtype)
        else:
            packed[name] = value
    out.mkdir()
    save_file(packed, out / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                     "quantization_mode": "offline"}
    (out / "config.json").write_text(json.dumps(config))
    return packed


def test_transformers_packed_form_loads_to_the_same_model(tiny, tmp_path):
    path, _ = tiny
    write_transformers_packed(path, tmp_path / "released")
    ids = ids_for(96, seed=7)
    assert torch.equal(load(tmp_path / "released").logits(ids), load(path).logits(ids))
    out = convert(tmp_path / "released", tmp_path / "packed", progress=False)
    assert torch.equal(load(out).logits(ids), load(path).logits(ids))


def test_transformers_packed_codes_unpack_as_transformers_does(tiny, tmp_path):
    from transformers.integrations.bitnet import unpack_weights
    path, _ = tiny
    packed = write_transformers_packed(path, tmp_path / "released")
    name = "model.layers.0.mlp.gate_proj.weight"
    with torch._dynamo.config.patch(disable=True):
        want = unpack_weights(packed[name], dtype=torch.float32).to(torch.int8)
    reader = memwise.checkpoint.CheckpointReader(tmp_path / "released")
    got = bitnet.TransformersPacked(reader).matrix(name, want.shape[1], None, rows=want.shape[0])
    assert torch.equal(got.ternary(), want)


def test_transformers_packed_code_3_is_refused(tiny, tmp_path):
    path, _ = tiny
    packed = write_transformers_packed(path, tmp_path / "released")
    packed["model.layers.1.self_attn.o_proj.weight"][0, 0] |= 3
    save_file(packed, tmp_path / "released" / "model.safetensors")
    with pytest.raises(CheckpointError, match="o_proj.weight' holds the invalid 2-bit code 3"):
        memwise.load(str(tmp_path / "released"))


# ---- presets -----------------------------------------------------------------------------------

def test_2b_4t_preset_is_bitnet_config_defaults_but_context_and_tie():
    import transformers
    preset = preset_config("bitnet-2b-4t")
    defaults = transformers.BitNetConfig().to_dict()
    differs = {key for key, value in preset.items() if key in defaults and defaults[key] != value}
    assert differs == {"max_position_embeddings", "tie_word_embeddings"}
    assert (preset["max_position_embeddings"], preset["tie_word_embeddings"]) == (4096, True)
    spec = bitnet.spec_from_config(preset, "preset")
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2560, 30, 20, 5, 128)
    assert (spec.intermediate_size, spec.vocab_size, spec.rope_theta, spec.norm_eps) == (6912, 128256, 500000.0, 1e-5)


def test_parameter_count_is_transformers_count(tiny):
    path, reference = tiny
    spec = memwise.load(str(path)).spec
    assert bitnet.parameter_count(spec) == reference.num_parameters()
    assert bitnet.parameter_count(bitnet.spec_from_config(preset_config("bitnet-2b-4t"), "p")) == 2_412_820_480


def test_info_of_the_2b_4t_preset(capsys):
    from memwise.cli import main
    assert main(["info", "preset:bitnet-2b-4t"]) in (0, None)
    out = capsys.readouterr().out
    assert "2,412,820,480" in out and "bitnet" in out


def test_synthetic_preset_is_packed_and_deterministic():
    spec = bitnet.spec_from_config(preset_config("tiny-bitnet"), "tiny")
    a, b, c = (bitnet.synthetic(spec, torch.float32, "cpu", seed=s) for s in (5, 5, 6))
    assert a.weights_bytes() == bitnet.weight_sizes(spec)["packed 2-bit"]
    assert torch.equal(a.layers[1].mlp.down.packed, b.layers[1].mlp.down.packed)
    assert not torch.equal(a.layers[1].mlp.down.packed, c.layers[1].mlp.down.packed)
    model = memwise.load("preset:tiny-bitnet")
    out = model.generate(torch.tensor([[1, 2, 3]]), 4, ignore_eos=True)
    assert out.shape == (1, 7) and model.synthetic


# ---- bad input ---------------------------------------------------------------------------------

def rewrite_config(path, tmp_path, **changes):
    """A copy of the checkpoint at `path` with config.json fields changed (None removes one)."""
    import shutil
    out = tmp_path / "changed"
    shutil.copytree(path, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return out


@pytest.mark.parametrize("changes, error, message", [
    ({"num_key_value_heads": 4}, CheckpointError, r"k_proj.weight' has shape .* num_key_value_heads 4 in .*config.json"),
    ({"hidden_act": "silu"}, UnsupportedError, r"config.json: hidden_act 'silu' is not supported"),
    ({"num_attention_heads": 3}, ConfigError, r"config.json: num_attention_heads 3 is not a multiple"),
    ({"head_dim": 8}, UnsupportedError, r"config.json: head_dim 8 x num_attention_heads"),
    ({"attention_bias": True}, UnsupportedError, r"config.json: attention_bias / mlp_bias true"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, UnsupportedError,
     r"config.json: rope type 'linear'"),
    ({"quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear"}}, UnsupportedError,
     r"config.json: quantization_config: linear_class 'bitlinear'"),
    ({"quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "use_rms_norm": True}},
     UnsupportedError, r"quantization_config: use_rms_norm true"),
    ({"num_hidden_layers": 1}, CheckpointError, r"holds layer\(s\) 1"),
    ({"intermediate_size": 90}, CheckpointError, r"gate_proj.weight' has shape \[96, 64\], expected \[90, 64\]"),
])
def test_bad_configs_are_one_clear_error(untied, tmp_path, changes, error, message):
    path, _ = untied
    with pytest.raises(error, match=message):
        memwise.load(str(rewrite_config(path, tmp_path, **changes)))


def test_missing_and_integer_tensors_are_named(tiny, tmp_path):
    path, _ = tiny
    tensors = load_file(path / "model.safetensors")
    out = rewrite_config(path, tmp_path)
    del tensors["model.layers.0.mlp.ffn_sub_norm.weight"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.ffn_sub_norm.weight' is missing"):
        memwise.load(str(out))
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.ffn_sub_norm.weight' is missing"):
        convert(out, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.self_attn.v_proj.weight"] = tensors["model.layers.1.self_attn.v_proj.weight"].to(torch.int32)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="v_proj.weight' is torch.int32, expected a floating-point latent"):
        memwise.load(str(out))


def test_bfloat16_compute_is_refused(tiny):
    path, _ = tiny
    with pytest.raises(UnsupportedError, match="bitnet computes in float32"):
        memwise.load(str(path), dtype="bfloat16")
    assert issubclass(UnsupportedError, MemwiseError)


def test_half_precision_lm_head_gives_float32_products(monkeypatch):
    """A bf16 lm_head is made float32 a chunk of rows at a time: the same logits as the whole matrix."""
    from memwise.models.bitnet import modules
    model = memwise.load("preset:tiny-bitnet").module
    assert model.lm_head is None and model.embeddings.dtype == torch.bfloat16
    x = torch.randn(2, 3, 64)
    monkeypatch.setattr(modules, "LOGITS_CHUNK_ELEMENTS", 64 * 7)     # 7 rows per chunk, a short last one
    assert_close(model._logits(x), torch.nn.functional.linear(x, model.embeddings.float()), 1e-6)


# ---- 1bitLLM's Llama-shaped BitNet b1.58 (model_type llama, BitnetForCausalLM) ------------------

ONE_BIT_LLM = dict(model_type="llama", architectures=["BitnetForCausalLM"], vocab_size=96, hidden_size=64,
                   intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                   weight_bits=1, input_bits=8, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def one_bit_llm_reference(w, config, ids):
    """The published math of 1bitLLM's modeling_bitnet.py / utils_quant.py in plain PyTorch: a Llama
    whose projections are BitLinear (latent weights made ternary by absmean, inputs int8 by absmax per
    token, both fake-quantized in float32), with RMSNorms before o_proj and down_proj."""
    eps, heads, kv = config["rms_norm_eps"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads

    def norm(x, gain):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain

    def bitlinear(x, weight):
        s = 1 / weight.abs().mean().clamp(min=1e-5)
        weight = (weight * s).round().clamp(-1, 1) / s
        a = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        return torch.nn.functional.linear((x * a).round().clamp(-128, 127) / a, weight)

    def rope(x):
        inv = 1 / config["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.arange(x.shape[2]).float()[:, None] * inv
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        return x * cos + torch.cat([-x[..., head_dim // 2:], x[..., :head_dim // 2]], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    batch, length = ids.shape
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q, k, v = (bitlinear(h, w[f"{p}self_attn.{m}_proj.weight"]).view(batch, length, -1, head_dim).transpose(1, 2)
                   for m in "qkv")
        q, k = rope(q), rope(k).repeat_interleave(heads // kv, 1)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v.repeat_interleave(heads // kv, 1),
                                                             is_causal=True)
        y = norm(y.transpose(1, 2).reshape(batch, length, -1), w[p + "self_attn.inner_attn_ln.weight"])
        x = x + bitlinear(y, w[p + "self_attn.o_proj.weight"])
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        y = torch.nn.functional.silu(bitlinear(h, w[p + "mlp.gate_proj.weight"])) * bitlinear(h, w[p + "mlp.up_proj.weight"])
        x = x + bitlinear(norm(y, w[p + "mlp.ffn_layernorm.weight"]), w[p + "mlp.down_proj.weight"])
    return torch.nn.functional.linear(norm(x, w["model.norm.weight"]), w["lm_head.weight"])


@pytest.fixture(scope="module")
def one_bit_llm(tmp_path_factory):
    """A tiny checkpoint in 1bitLLM's layout: random latent weights, norms around 1."""
    path = tmp_path_factory.mktemp("one-bit-llm")
    spec = bitnet.spec_from_config(ONE_BIT_LLM, "test")
    generator = torch.Generator().manual_seed(3)
    tensors = {slot.name: (torch.rand(slot.shape, generator=generator) + 0.5 if len(slot.shape) == 1
                           else torch.randn(slot.shape, generator=generator) * 0.1)
               for slot in bitnet.checkpoint_layout(spec)}
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(ONE_BIT_LLM))
    return path, tensors


def test_one_bit_llm_matches_its_published_math(one_bit_llm):
    path, tensors = one_bit_llm
    model = load(path)
    assert model.spec.model_type == "llama" and isinstance(model.module, bitnet.BitNetForCausalLM)
    ids = ids_for(96, seed=8)
    want = one_bit_llm_reference(tensors, ONE_BIT_LLM, ids)
    got = model.logits(ids)
    diff = float((got - want).abs().max() / (want.max() - want.min()))
    print(f"largest difference / logit spread: {diff:.2e}")
    assert diff < 1e-4 and torch.equal(got.argmax(-1), want.argmax(-1))
    assert_close(load(path, "auto").logits(ids), want, BITLINEAR_REL)


def test_one_bit_llm_converts_and_a_plain_llama_stays_a_decoder(one_bit_llm, tmp_path):
    path, _ = one_bit_llm
    out = convert(path, tmp_path / "packed", progress=False)
    ids = ids_for(96, seed=9)
    assert torch.equal(load(out).logits(ids), load(path).logits(ids))
    plain = memwise.load("preset:tiny-llama")
    assert not isinstance(plain.module, bitnet.BitNetForCausalLM)
    for name in ("bitnet-b1.58-large", "bitnet-b1.58-3b"):
        assert memwise.models.family_for_config(preset_config(name), name) is bitnet


def test_one_bit_llm_bad_bits_are_refused(one_bit_llm, tmp_path):
    path, _ = one_bit_llm
    with pytest.raises(UnsupportedError, match=r"config.json: weight_bits 2 is not supported"):
        memwise.load(str(rewrite_config(path, tmp_path, weight_bits=2)))


def test_one_bit_llm_without_lm_head_uses_the_embedding(one_bit_llm, tmp_path):
    """1bitLLM's released checkpoints hold no lm_head: with tie_word_embeddings absent (LlamaConfig's
    default false) the output is the embedding, as in the published math with a tied head."""
    path, tensors = one_bit_llm
    untied_config = {k: v for k, v in ONE_BIT_LLM.items() if k != "tie_word_embeddings"}
    out = tmp_path / "no-head"
    out.mkdir()
    headless = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file(headless, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(untied_config))
    ids = ids_for(96, seed=4)
    want = one_bit_llm_reference({**headless, "lm_head.weight": tensors["model.embed_tokens.weight"]},
                                 ONE_BIT_LLM, ids)
    got = load(out).logits(ids)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert ((got - want).abs().max() / (want.max() - want.min())) < 1e-4
