"""ModelSpec: the one normalized description of a model, made from config.json by its family.

Every family (see memwise.models) turns its Hugging Face config into this dataclass; nothing after
loading reads config.json again. Fields that a family does not use keep their defaults.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from memwise.errors import ConfigError, shown
from memwise.json_file import read_json_object


@dataclass
class ModelSpec:
    model_type: str                 # config.json's model_type, e.g. "gpt2", "hgrn_bit"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    # Attention decoders (gpt2, opt, phi, llama, mistral)
    num_kv_heads: int = 0           # < num_heads: grouped-query attention
    head_dim: int = 0
    norm: str = "layernorm"         # "layernorm" | "rmsnorm"
    activation: str = "gelu"        # "gelu" (erf), "gelu_new" (tanh), "relu", "silu"
    gated_mlp: bool = False         # llama-style act(gate) * up
    parallel_block: bool = False    # phi: attention and MLP read the same normed input
    pre_norm: bool = True           # opt-350m is post-norm
    final_norm: bool = True
    attention_bias: bool = False    # q/k/v projections
    attention_out_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    positions: str = "learned"      # "learned" | "rotary" | "none"
    position_offset: int = 0        # opt's learned positions start at 2
    rotary_dim: int = 0             # phi rotates only part of each head
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    embed_dim: int = 0              # opt's word_embed_proj_dim (project_in / project_out when != hidden)

    # MatMul-free (hgrn_bit)
    expand_ratio: int = 1
    use_lower_bound: bool = True

    # Where it came from, for messages and reports
    source: str = ""
    synthetic: bool = False         # weights are random, not a real checkpoint

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def per_layer_linear(count: Callable[[ModelSpec], Any], spec: ModelSpec) -> Any:
    """count(spec), an int or a dict of ints that grows linearly with the number of layers, computed
    from specs of zero and one layer: the same answer in constant time, so that a config claiming
    10^9 layers is measured (and refused by the memory check) instead of being walked layer by layer."""
    none, one = count(replace(spec, num_layers=0)), count(replace(spec, num_layers=1))
    if isinstance(none, dict):
        return {key: none[key] + spec.num_layers * (one[key] - none[key]) for key in none}
    return none + spec.num_layers * (one - none)


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict, with errors that name the file."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: config.json not found (a model directory needs one)")
    return read_json_object(path, ConfigError)


def require(config: dict[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    """config[key] checked for type (a float must be finite); a missing key without a default is an
    error naming the file and field."""
    if key not in config or config[key] is None:
        if default is ...:
            raise ConfigError(f"{where}: field '{key}' is missing")
        return default
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: field '{key}' should be {kind.__name__}, found {shown(value)}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: field '{key}' should be a finite number, found {value!r}")
    return value


def special_token_fields(config: dict[str, Any], where: str,
                         bos_default: int | None = None, eos_default: tuple[int, ...] = ()) -> dict[str, Any]:
    """bos_token_id, eos_token_ids and pad_token_id of a config, checked to be non-negative integers.
    An id outside the vocabulary is kept, as transformers keeps it with a warning: tiny test models
    inherit GPT-2's ids; such an EOS is never generated, and a prompt's ids are checked when given."""
    fields: dict[str, Any] = {}
    for key, default in (("bos_token_id", bos_default), ("pad_token_id", None)):
        value = require(config, key, int, where, default)
        if value is not None and value < 0:
            raise ConfigError(f"{where}: field '{key}' should be a token id (>= 0), found {value}")
        fields[key] = value
    eos = config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ConfigError(f"{where}: field 'eos_token_id' should be a token id or a list of them, "
                          f"found {shown(eos)}")
    fields["eos_token_ids"] = tuple(ids) or eos_default
    return fields

