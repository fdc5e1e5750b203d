"""The bitnet config.json (BitNet b1.58, microsoft/bitnet-b1.58-2B-4T), as transformers' BitNetConfig
reads it, turned into a ModelSpec.

Defaults are BitNetConfig's (transformers 5): vocab 128256, hidden 2560, intermediate 6912, 30 layers,
20 heads, 5 key/value heads, relu2, rms_norm_eps 1e-5, rope_theta 500000, max_position_embeddings
2048, untied embeddings. What transformers makes ternary is decided by `quantization_config`: every
projection of the layers is an AutoBitLinear, the lm_head stays full precision (transformers never
converts the output embedding).

The Llama-shaped BitNet b1.58 models of 1bitLLM (bitnet_b1_58-large, -3B) say model_type "llama"
and architectures ["BitnetForCausalLM"] (their own code; memwise.models routes them here). They are
the same network with SiLU in the GLU, LlamaConfig's defaults, and their sub-norms named
inner_attn_ln / ffn_layernorm; their BitLinear is the same W1.58A8 quantization of latent weights
(weight_bits 1, input_bits 8), the lm_head full precision. Their spec keeps model_type "llama".
"""
from __future__ import annotations

from typing import Any

from memwise.errors import ConfigError, UnsupportedError
from memwise.models.decoder.config import rope_fields
from memwise.spec import ModelSpec, require, special_token_fields

MODEL_TYPES = ("bitnet",)

# Absent fields: BitNetConfig's defaults for "bitnet", LlamaConfig's for the Llama-shaped 1bitLLM models
# (whose num_key_value_heads default None means one per head).
DEFAULTS = {
    "bitnet": dict(hidden_size=2560, num_hidden_layers=30, vocab_size=128256, num_attention_heads=20,
                   intermediate_size=6912, max_position_embeddings=2048, num_key_value_heads=5, rms_norm_eps=1e-5,
                   rope_theta=500000.0, hidden_act="relu2", bos_token_id=128000, eos_token_id=128001),
    "llama": dict(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, num_attention_heads=32,
                  intermediate_size=11008, max_position_embeddings=2048, num_key_value_heads=None, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2),
}
ACTIVATIONS = {"relu2": "relu2", "silu": "silu", "swish": "silu"}

# quantization_config values memwise runs: "online" = latent weights quantized at run time (the bf16
# release), "offline" = codes packed by transformers (the packed release).
QUANTIZATION_MODES = ("online", "offline")


def spec_from_config(config: dict[str, Any], where: str) -> ModelSpec:
    """ModelSpec of a bitnet (or 1bitLLM "llama") config.json, with its config class's defaults."""
    flavour = "llama" if config.get("model_type") == "llama" else "bitnet"
    defaults = DEFAULTS[flavour]
    sizes = {key: require(config, key, int, where, defaults[key]) for key in (
        "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size",
        "max_position_embeddings")}
    # BitNetConfig: an absent field means 5 key/value heads, an explicit null means one per head.
    kv_heads = config.get("num_key_value_heads", defaults["num_key_value_heads"])
    if kv_heads is None:
        kv_heads = sizes["num_attention_heads"]
    sizes["num_key_value_heads"] = require({"num_key_value_heads": kv_heads}, "num_key_value_heads", int, where)
    for key, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{where}: field '{key}' must be >= 1, found {value}")
    hidden, heads, kv = sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if heads % kv:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    head_dim = _head_dim(config, hidden, heads, where)
    eps = require(config, "rms_norm_eps", float, where, defaults["rms_norm_eps"])
    if not eps > 0:
        raise ConfigError(f"{where}: field 'rms_norm_eps' must be > 0, found {eps}")
    activation = _check_choices(config, where, flavour)
    theta, scaling, _ = rope_fields(config, where, sizes["max_position_embeddings"], default_partial=1.0,
                                    default_theta=defaults["rope_theta"])
    if scaling is not None:
        raise UnsupportedError(f"{where}: rope type {scaling['rope_type']!r} is not supported for bitnet "
                               "(only the default rotary embedding)")
    return ModelSpec(
        model_type=flavour, vocab_size=sizes["vocab_size"], hidden_size=hidden,
        num_layers=sizes["num_hidden_layers"], num_heads=heads, intermediate_size=sizes["intermediate_size"],
        max_positions=sizes["max_position_embeddings"], norm_eps=eps,
        tie_word_embeddings=require(config, "tie_word_embeddings", bool, where, False),
        **special_token_fields(config, where, bos_default=defaults["bos_token_id"],
                               eos_default=(defaults["eos_token_id"],)),
        num_kv_heads=kv, head_dim=head_dim, norm="rmsnorm", activation=activation, gated_mlp=True,
        positions="rotary", rotary_dim=head_dim, rope_theta=theta, embed_dim=hidden)


def _head_dim(config: dict[str, Any], hidden: int, heads: int, where: str) -> int:
    """hidden_size / heads; a head_dim field must agree, because attn_sub_norm is hidden_size wide."""
    head_dim = require(config, "head_dim", int, where, None)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        return hidden // heads
    if head_dim * heads != hidden:
        raise UnsupportedError(f"{where}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size "
                               f"{hidden}; bitnet's attn_sub_norm needs them equal")
    return head_dim


def _check_choices(config: dict[str, Any], where: str, flavour: str) -> str:
    """Fields whose other values change the computation in ways memwise does not implement; the
    activation of the GLU."""
    want = DEFAULTS[flavour]["hidden_act"]
    act = require(config, "hidden_act", str, where, want)
    if ACTIVATIONS.get(act) != want:
        raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported (this BitNet uses {want!r})")
    if require(config, "attention_bias", bool, where, False) or require(config, "mlp_bias", bool, where, False):
        raise UnsupportedError(f"{where}: attention_bias / mlp_bias true is not supported (BitNet's projections "
                               "have no bias)")
    for key, bits in (("weight_bits", 1), ("input_bits", 8)):     # 1bitLLM's BitLinear settings
        if require(config, key, int, where, bits) != bits:
            raise UnsupportedError(f"{where}: {key} {config[key]} is not supported (BitNet b1.58: {bits})")
    quant = config.get("quantization_config")
    if quant is not None:
        _check_quantization(quant, where)
    return want


def _check_quantization(quant: Any, where: str) -> None:
    """transformers' BitNet quantization_config: what is ternary and how its scale is stored."""
    sub = f"{where}: quantization_config"
    if not isinstance(quant, dict):
        raise ConfigError(f"{sub} should be an object, found {type(quant).__name__}")
    method = require(quant, "quant_method", str, sub, "bitnet")
    if method != "bitnet":
        raise UnsupportedError(f"{sub}: quant_method {method!r} is not supported (only 'bitnet')")
    linear = require(quant, "linear_class", str, sub, "bitlinear")
    if linear != "autobitlinear":
        # transformers' "bitlinear" class divides by its weight_scale where autobitlinear multiplies.
        raise UnsupportedError(f"{sub}: linear_class {linear!r} is not supported (only 'autobitlinear', as "
                               "microsoft/bitnet-b1.58-2B-4T uses)")
    mode = require(quant, "quantization_mode", str, sub, "offline")
    if mode not in QUANTIZATION_MODES:
        raise UnsupportedError(f"{sub}: quantization_mode {mode!r} is not supported ({', '.join(QUANTIZATION_MODES)})")
    if require(quant, "use_rms_norm", bool, sub, False):
        raise UnsupportedError(f"{sub}: use_rms_norm true is not supported (bitnet's norms are its own layers)")
    kept = quant.get("modules_to_not_convert") or []
    if not isinstance(kept, list) or any(not isinstance(m, str) or "lm_head" not in m for m in kept):
        raise UnsupportedError(f"{sub}: modules_to_not_convert {kept!r} is not supported (only the lm_head "
                               "stays full precision)")
