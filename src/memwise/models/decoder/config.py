"""config.json -> ModelSpec for the decoder families: each family's field names, defaults and limits.

The families differ only in choices that ModelSpec names (norm kind, activation, gated MLP, learned or
rotary positions, parallel block, pre/post norm, biases), so one spec and one Decoder cover them.
"""
from __future__ import annotations

from typing import Any

from memwise.errors import ConfigError, UnsupportedError
from memwise.spec import ModelSpec, require, special_token_fields

MODEL_TYPES = ("gpt2", "opt", "phi", "llama", "mistral")

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def spec_from_config(config: dict[str, Any], where: str) -> ModelSpec:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedError(f"{where}: model_type {model_type!r} is not a decoder family "
                               f"({', '.join(MODEL_TYPES)})")
    vocab_size = _positive(config, "vocab_size", where)
    common = dict(model_type=model_type, vocab_size=vocab_size,
                  **special_token_fields(config, where))
    spec = {"gpt2": _gpt2_spec, "opt": _opt_spec, "phi": _phi_spec}.get(model_type, _llama_spec)(config, where, common)
    if not spec.norm_eps > 0:
        raise ConfigError(f"{where}: the norm epsilon must be > 0, found {spec.norm_eps!r}")
    if spec.num_heads % spec.num_kv_heads:
        raise ConfigError(f"{where}: {spec.num_heads} attention heads are not a multiple of "
                          f"{spec.num_kv_heads} key/value heads")
    if spec.positions == "rotary" and (spec.rotary_dim % 2 or not 0 < spec.rotary_dim <= spec.head_dim):
        raise ConfigError(f"{where}: rotary dimension {spec.rotary_dim} must be even and in (0, head_dim "
                          f"{spec.head_dim}]")
    return spec


def _positive(config: dict[str, Any], key: str, where: str, default: Any = ...) -> int:
    value = require(config, key, int, where, default)
    if value <= 0:
        raise ConfigError(f"{where}: field '{key}' should be a positive integer, found {value!r}")
    return value


def _head_dim(config: dict[str, Any], hidden: int, heads: int, where: str, heads_key: str) -> int:
    head_dim = require(config, "head_dim", int, where, None)
    if head_dim is not None:
        if head_dim <= 0:
            raise ConfigError(f"{where}: field 'head_dim' should be a positive integer, found {head_dim!r}")
        return head_dim
    if hidden % heads:
        raise ConfigError(f"{where}: hidden size {hidden} is not divisible by '{heads_key}' = {heads}")
    return hidden // heads


def _activation(config: dict[str, Any], key: str, where: str, default: str) -> str:
    name = require(config, key, str, where, default)
    if name not in _ACTIVATIONS:
        raise UnsupportedError(f"{where}: {key} {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _gpt2_spec(config: dict[str, Any], where: str, common: dict[str, Any]) -> ModelSpec:
    hidden = _positive(config, "n_embd", where)
    heads = _positive(config, "n_head", where)
    # Both change the attention scale; no released GPT-2 checkpoint sets them.
    for key, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if require(config, key, bool, where, default) != default:
            raise UnsupportedError(f"{where}: {key} = {not default} is not supported")
    return ModelSpec(
        **common, hidden_size=hidden, num_layers=_positive(config, "n_layer", where), num_heads=heads,
        num_kv_heads=heads, head_dim=_head_dim({}, hidden, heads, where, "n_head"),
        intermediate_size=_positive(config, "n_inner", where, 4 * hidden),
        max_positions=_positive(config, "n_positions", where),
        norm_eps=require(config, "layer_norm_epsilon", float, where, 1e-5),
        tie_word_embeddings=require(config, "tie_word_embeddings", bool, where, True),
        activation=_activation(config, "activation_function", where, "gelu_new"),
        attention_bias=True, attention_out_bias=True, mlp_bias=True, positions="learned", embed_dim=hidden)


def _opt_spec(config: dict[str, Any], where: str, common: dict[str, Any]) -> ModelSpec:
    hidden = _positive(config, "hidden_size", where)
    heads = _positive(config, "num_attention_heads", where)
    if not require(config, "layer_norm_elementwise_affine", bool, where, True):
        raise UnsupportedError(f"{where}: layer_norm_elementwise_affine = false is not supported")
    pre_norm = require(config, "do_layer_norm_before", bool, where, True)
    bias = require(config, "enable_bias", bool, where, True)
    return ModelSpec(
        **common, hidden_size=hidden, num_layers=_positive(config, "num_hidden_layers", where), num_heads=heads,
        num_kv_heads=heads, head_dim=_head_dim({}, hidden, heads, where, "num_attention_heads"),
        intermediate_size=_positive(config, "ffn_dim", where),
        max_positions=_positive(config, "max_position_embeddings", where),
        norm_eps=1e-5,  # OPT's LayerNorms use PyTorch's default eps
        tie_word_embeddings=require(config, "tie_word_embeddings", bool, where, True),
        activation=_activation(config, "activation_function", where, "relu"),
        pre_norm=pre_norm,
        final_norm=pre_norm and not require(config, "_remove_final_layer_norm", bool, where, False),
        attention_bias=bias, attention_out_bias=bias, mlp_bias=bias,
        positions="learned", position_offset=2,
        embed_dim=_positive(config, "word_embed_proj_dim", where, hidden))


def _phi_spec(config: dict[str, Any], where: str, common: dict[str, Any]) -> ModelSpec:
    if require(config, "qk_layernorm", bool, where, False):
        raise UnsupportedError(f"{where}: qk_layernorm = true is not supported for phi")
    hidden = _positive(config, "hidden_size", where)
    heads = _positive(config, "num_attention_heads", where)
    head_dim = _head_dim(config, hidden, heads, where, "num_attention_heads")
    max_positions = _positive(config, "max_position_embeddings", where, 2048)
    theta, scaling, partial = rope_fields(config, where, max_positions, default_partial=0.5)
    return ModelSpec(
        **common, hidden_size=hidden, num_layers=_positive(config, "num_hidden_layers", where), num_heads=heads,
        num_kv_heads=_positive(config, "num_key_value_heads", where, heads), head_dim=head_dim,
        intermediate_size=_positive(config, "intermediate_size", where), max_positions=max_positions,
        norm_eps=require(config, "layer_norm_eps", float, where, 1e-5),
        tie_word_embeddings=require(config, "tie_word_embeddings", bool, where, False),
        activation=_activation(config, "hidden_act", where, "gelu_new"),
        parallel_block=True, attention_bias=True, attention_out_bias=True, mlp_bias=True, lm_head_bias=True,
        positions="rotary", rotary_dim=int(head_dim * partial), rope_theta=theta, rope_scaling=scaling,
        embed_dim=hidden)


def _llama_spec(config: dict[str, Any], where: str, common: dict[str, Any]) -> ModelSpec:
    hidden = _positive(config, "hidden_size", where)
    heads = _positive(config, "num_attention_heads", where)
    head_dim = _head_dim(config, hidden, heads, where, "num_attention_heads")
    mistral = common["model_type"] == "mistral"
    max_positions = _positive(config, "max_position_embeddings", where, 131072 if mistral else 2048)
    # Llama's default rotary embedding ignores partial_rotary_factor, so it is not read here.
    theta, scaling, _ = rope_fields(config, where, max_positions, default_partial=1.0)
    attention_bias = False if mistral else require(config, "attention_bias", bool, where, False)
    sliding_window = None
    if mistral:
        # Hugging Face's default when the key is absent is 4096; an explicit null means no window.
        sliding_window = config.get("sliding_window", 4096)
        if sliding_window is not None and (not isinstance(sliding_window, int) or isinstance(sliding_window, bool)
                                           or sliding_window <= 0):
            raise ConfigError(f"{where}: field 'sliding_window' should be a positive integer or null, "
                              f"found {sliding_window!r}")
    return ModelSpec(
        **common, hidden_size=hidden, num_layers=_positive(config, "num_hidden_layers", where), num_heads=heads,
        num_kv_heads=_positive(config, "num_key_value_heads", where, heads), head_dim=head_dim,
        intermediate_size=_positive(config, "intermediate_size", where), max_positions=max_positions,
        norm_eps=require(config, "rms_norm_eps", float, where, 1e-6),
        tie_word_embeddings=require(config, "tie_word_embeddings", bool, where, False),
        norm="rmsnorm", activation=_activation(config, "hidden_act", where, "silu"), gated_mlp=True,
        attention_bias=attention_bias, attention_out_bias=attention_bias,
        mlp_bias=False if mistral else require(config, "mlp_bias", bool, where, False),
        positions="rotary", rotary_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
        sliding_window=sliding_window, embed_dim=hidden)


def rope_fields(config: dict[str, Any], where: str, max_positions: int, default_partial: float,
                default_theta: float = 10000.0) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, normalized scaling or None, partial rotary factor) from either spelling of a config:
    hub checkpoints write rope_theta / rope_scaling / partial_rotary_factor at the top level,
    transformers 5 writes one rope_parameters dict that holds all of them."""
    merged: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: field '{key}' should be an object, found {value!r}")
        merged.update(value or {})
    merged = {k: v for k, v in merged.items() if v is not None}
    theta = require(merged, "rope_theta", float, where, None)
    if theta is None:
        theta = require(config, "rope_theta", float, where, default_theta)
    partial = require(merged, "partial_rotary_factor", float, where, None)
    if partial is None:
        partial = require(config, "partial_rotary_factor", float, where, default_partial)
    if theta <= 0 or not 0 < partial <= 1:
        raise ConfigError(f"{where}: rope_theta must be > 0 and partial_rotary_factor in (0, 1], "
                          f"found {theta!r} and {partial!r}")
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise UnsupportedError(f"{where}: rope type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if kind == "default":
        return theta, None, partial
    sub = f"{where}: rope scaling"
    scaling: dict[str, Any] = {"rope_type": kind, "factor": require(merged, "factor", float, sub)}
    if scaling["factor"] <= 0:
        raise ConfigError(f"{sub}: field 'factor' should be > 0, found {scaling['factor']!r}")
    if kind == "llama3":
        scaling["low_freq_factor"] = require(merged, "low_freq_factor", float, sub)
        scaling["high_freq_factor"] = require(merged, "high_freq_factor", float, sub)
        scaling["original_max_position_embeddings"] = require(
            merged, "original_max_position_embeddings", int, sub,
            require(config, "original_max_position_embeddings", int, where, max_positions))
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError(f"{sub}: high_freq_factor must exceed low_freq_factor")
    return theta, scaling, partial

