"""The hgrn_bit config.json, as the released checkpoints' reference code reads it, turned into a ModelSpec."""
from __future__ import annotations

import math
from typing import Any

from memwise.errors import ConfigError, UnsupportedError
from memwise.spec import ModelSpec, require, special_token_fields

MODEL_TYPES = ("hgrn_bit",)


def spec_from_config(config: dict[str, Any], where: str) -> ModelSpec:
    """ModelSpec of an hgrn_bit config.json, with the reference code's defaults for absent fields."""
    hidden = require(config, "hidden_size", int, where, 2048)
    layers = require(config, "num_hidden_layers", int, where, 24)
    vocab = require(config, "vocab_size", int, where, 32000)
    heads = require(config, "num_heads", int, where, 1)
    expand = require(config, "expand_ratio", int, where, 1)
    hidden_ratio = require(config, "hidden_ratio", float, where, 4.0)
    eps = require(config, "rms_norm_eps", float, where, 1e-6)
    use_lower_bound = require(config, "use_lower_bound", bool, where, True)
    use_short_conv = require(config, "use_short_conv", bool, where, False)
    attn_mode = require(config, "attn_mode", str, where, "fused_recurrent")
    hidden_act = require(config, "hidden_act", str, where, "swish")
    tie = require(config, "tie_word_embeddings", bool, where, False)
    max_positions = require(config, "max_position_embeddings", int, where, 2048)

    for key, value in (("hidden_size", hidden), ("num_hidden_layers", layers), ("vocab_size", vocab),
                       ("num_heads", heads), ("expand_ratio", expand), ("max_position_embeddings", max_positions)):
        if value < 1:
            raise ConfigError(f"{where}: field '{key}' must be >= 1, found {value}")
    if not eps > 0:
        raise ConfigError(f"{where}: field 'rms_norm_eps' must be > 0, found {eps}")
    if use_short_conv:
        raise UnsupportedError(f"{where}: use_short_conv is true; memwise runs hgrn_bit without the short "
                               "convolution only (the released MMfreeLM checkpoints set it to false)")
    if attn_mode != "fused_recurrent":
        raise UnsupportedError(f"{where}: attn_mode {attn_mode!r} is not supported (only 'fused_recurrent')")
    if hidden_act not in ("swish", "silu"):
        raise UnsupportedError(f"{where}: hidden_act {hidden_act!r} is not supported (hgrn_bit uses 'swish')")
    width = hidden * expand
    if width % heads:
        raise ConfigError(f"{where}: num_heads {heads} does not divide the recurrence width "
                          f"hidden_size * expand_ratio = {width}")
    if use_lower_bound and expand != 1:
        # The reference code keeps lower bounds [L, hidden_size] and adds them to a gate that is
        # hidden_size * expand_ratio wide, so no released code runs this combination.
        raise UnsupportedError(f"{where}: expand_ratio {expand} with use_lower_bound true is not supported "
                               "(the lower bounds are hidden_size wide; released models use expand_ratio 1)")

    intermediate = require(config, "intermediate_size", int, where, 0)
    if intermediate == 0:
        intermediate = 256 * math.ceil(int(hidden * hidden_ratio * 2 / 3) / 256)
    if intermediate < 1:
        raise ConfigError(f"{where}: field 'intermediate_size' must be >= 1, found {intermediate}")

    return ModelSpec(
        model_type="hgrn_bit", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=intermediate, max_positions=max_positions, norm_eps=eps,
        tie_word_embeddings=tie,
        **special_token_fields(config, where, bos_default=1, eos_default=(2,)),
        head_dim=width // heads, norm="rmsnorm", activation="silu", gated_mlp=True, positions="none",
        expand_ratio=expand, use_lower_bound=use_lower_bound)



def recurrence_width(spec: ModelSpec) -> int:
    return spec.hidden_size * spec.expand_ratio

