"""Conventional decoder Transformers: gpt2, opt, phi, llama and mistral as one module.

The families differ only in choices that ModelSpec names (norm kind, activation, gated MLP, learned or
rotary positions, parallel block, pre/post norm, biases), so one Decoder covers them; checkpoint
layouts are mapped at load time (memwise.models.decoder_load) and the forward pass stays plain.

Batches are left-padded. The cache remembers which slots hold real tokens; a token's position is the
number of real tokens before it (Hugging Face's cumsum(mask) - 1 during generate), so a prompt gives
the same logits alone and in a padded batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memwise.checkpoint import CheckpointReader
from memwise.errors import CheckpointError, ConfigError, UnsupportedError
from memwise.models.decoder_load import checkpoint_plan
from memwise.spec import ModelSpec, eos_ids, require

MODEL_TYPES = ("gpt2", "opt", "phi", "llama", "mistral")

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


# ----------------------------------------------------------------------------------------------------
# config.json -> ModelSpec


def spec_from_config(config: dict[str, Any], where: str) -> ModelSpec:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedError(f"{where}: model_type {model_type!r} is not a decoder family "
                               f"({', '.join(MODEL_TYPES)})")
    common = dict(
        model_type=model_type,
        vocab_size=_positive(config, "vocab_size", where),
        bos_token_id=require(config, "bos_token_id", int, where, None),
        eos_token_ids=eos_ids(config),
        pad_token_id=require(config, "pad_token_id", int, where, None),
    )
    spec = {"gpt2": _gpt2_spec, "opt": _opt_spec, "phi": _phi_spec}.get(model_type, _llama_spec)(config, where, common)
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
    theta, scaling, partial = _rope(config, where, max_positions, default_partial=0.5)
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
    theta, scaling, _ = _rope(config, where, max_positions, default_partial=1.0)
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


def _rope(config: dict[str, Any], where: str, max_positions: int,
          default_partial: float) -> tuple[float, dict[str, Any] | None, float]:
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
        theta = require(config, "rope_theta", float, where, 10000.0)
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


# ----------------------------------------------------------------------------------------------------
# The model


class DecoderCache:
    """Preallocated keys and values of every layer, [B, kv_heads, max_length, head_dim] each.

    Slots are shared by the batch (slot s is the s-th token given to forward for every row); `mask`
    says which slots hold real tokens and `real_count` how many real tokens each row has so far.
    """

    def __init__(self, spec: ModelSpec, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, spec.num_kv_heads, max_length, spec.head_dim)
        # empty, not zeros: slots are only ever read after they are written
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.mask = torch.zeros((batch_size, max_length), dtype=torch.bool, device=device)
        self.real_count = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.batch_size, self.max_length = batch_size, max_length
        self.length = 0         # slots written
        self.padded = False     # some slot so far is padding

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys/values at the current slots; all keys/values so far, as views."""
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Like Hugging Face: normalize in float32, round to the model's dtype, then scale.
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype) * self.weight


def _norm(spec: ModelSpec, size: int) -> nn.Module:
    return RMSNorm(size, spec.norm_eps) if spec.norm == "rmsnorm" else nn.LayerNorm(size, eps=spec.norm_eps)


def _activate(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu_new":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    return F.silu(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    swapped = torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1)
    rotated = rotated * cos + swapped * sin
    return rotated if passed.shape[-1] == 0 else torch.cat((rotated, passed), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.split = (q, kv, kv)
        self.qkv = nn.Linear(spec.hidden_size, q + 2 * kv, bias=spec.attention_bias)
        self.out = nn.Linear(q, spec.hidden_size, bias=spec.attention_out_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: DecoderCache,
                mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(y.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.activation, self.gated = spec.activation, spec.gated_mlp
        inner = spec.intermediate_size
        # gated: one matrix holds gate (first half of the rows) and up (second half)
        self.up = nn.Linear(spec.hidden_size, 2 * inner if self.gated else inner, bias=spec.mlp_bias)
        self.down = nn.Linear(inner, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(_activate(self.activation, gate) * up)
        return self.down(_activate(self.activation, h))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.parallel, self.pre_norm = spec.parallel_block, spec.pre_norm
        self.attn_norm = _norm(spec, spec.hidden_size)
        self.attn = Attention(spec, layer)
        self.mlp_norm = None if spec.parallel_block else _norm(spec, spec.hidden_size)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, rope, cache: DecoderCache, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        if self.parallel:
            h = self.attn_norm(x)
            return self.attn(h, rope, cache, mask, causal) + self.mlp(h) + x
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), rope, cache, mask, causal)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, rope, cache, mask, causal))
        return self.mlp_norm(x + self.mlp(x))


class Decoder(nn.Module):
    """A decoder-only Transformer described by a ModelSpec; the family's CausalLM."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        hidden, embed = spec.hidden_size, spec.embed_dim or spec.hidden_size
        self.embed = nn.Embedding(spec.vocab_size, embed)
        self.project_in = nn.Linear(embed, hidden, bias=False) if embed != hidden else None
        self.positions = nn.Embedding(spec.max_positions, hidden) if spec.positions == "learned" else None
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = _norm(spec, hidden) if spec.final_norm else None
        self.project_out = nn.Linear(hidden, embed, bias=False) if embed != hidden else None
        self.lm_head = nn.Linear(embed, spec.vocab_size, bias=spec.lm_head_bias)
        self.tie_weights()
        self.inv_freq: torch.Tensor | None = None

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_rotary(self) -> None:
        """Rotary frequencies in float32 on the model's device (kept out of the state dict and of .to(dtype))."""
        if self.spec.positions == "rotary":
            self.inv_freq = rotary_inv_freq(self.spec, device=self.embed.weight.device)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, batch_size: int, max_length: int) -> DecoderCache:
        if self.spec.positions == "learned" and max_length > self.spec.max_positions:
            raise UnsupportedError(f"{self.spec.model_type}: {max_length} tokens (prompt + new tokens) exceed the "
                                   f"model's {self.spec.max_positions} learned positions")
        return DecoderCache(self.spec, batch_size, max_length, self.dtype, self.device)

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: all but the embedding tables, of which it reads one row
        (an input embedding tied to the lm_head is read whole by the lm_head)."""
        skipped = [] if self.spec.tie_word_embeddings else [self.embed.weight]
        if self.positions is not None:
            skipped.append(self.positions.weight)
        return self.weights_bytes() - sum(p.numel() * p.element_size() for p in skipped)

    def forward(self, input_ids: torch.Tensor, cache: DecoderCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        batch, length = input_ids.shape
        if cache is None:
            cache = self.new_cache(batch, length)
        start, end = cache.length, cache.length + length
        if end > cache.max_length or batch != cache.batch_size:
            raise ValueError(f"cache holds {cache.batch_size} x {cache.max_length} slots; "
                             f"{batch} x {length} tokens do not fit after {start}")

        if attention_mask is None:
            positions = cache.real_count[:, None] + torch.arange(length, device=input_ids.device)
            cache.mask[:, start:end] = True
            cache.real_count += length
        else:
            real = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            positions = (cache.real_count[:, None] + real.cumsum(dim=1) - 1).masked_fill_(~real, 0)
            cache.mask[:, start:end] = real
            cache.real_count += real.sum(dim=1)
            if not cache.padded:
                cache.padded = not bool(real.all())

        x = self.embed(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        rope = None
        if self.positions is not None:
            x = x + self.positions(positions)
        else:
            rope = self._rope(positions, x.dtype)
        mask, causal = self._attention_mask(cache, start, length)

        for layer in self.layers:
            x = layer(x, rope, cache, mask, causal)
        cache.length = end

        if last_only:
            x = x[:, -1:]
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return self.lm_head(x).float()

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq is None or inv_freq.device != positions.device:
            inv_freq = self.inv_freq = rotary_inv_freq(self.spec, device=positions.device)
        scaling = self.spec.rope_scaling
        if scaling is not None and scaling["rope_type"] == "dynamic":
            # Hugging Face keeps the frequencies of the longest sequence seen across calls; within one
            # generation positions only grow, so deriving them from this call's longest row is the same.
            seen = int(positions.max()) + 1
            if seen > self.spec.max_positions:
                inv_freq = rotary_inv_freq(self.spec, device=positions.device, seq_len=seen)
        freqs = positions[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]      # [B, 1, T, rotary_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _attention_mask(self, cache: DecoderCache, start: int, length: int) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask [B, 1, T, S] or None, is_causal) for the new tokens against all slots so far."""
        end = start + length
        window = self.spec.sliding_window
        windowed = window is not None and end > window
        if not cache.padded and not windowed:
            if length == 1:
                return None, False
            if start == 0:
                return None, True
        device = cache.mask.device
        query = torch.arange(start, end, device=device)[:, None]
        key = torch.arange(end, device=device)[None, :]
        allowed = key <= query
        if windowed:
            # Hugging Face measures the window in slots, padding included
            allowed &= key > query - window
        if not cache.padded:
            return allowed[None, None], False
        # A padded query sees only itself, which keeps its softmax finite; no real token ever sees it.
        return allowed & (cache.mask[:, None, None, :end] | (key == query)), False


def rotary_inv_freq(spec: ModelSpec, device: torch.device | str = "cpu", seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (float32, rotary_dim / 2) after the spec's rope scaling."""
    dim = spec.rotary_dim
    theta = spec.rope_theta
    scaling = spec.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "dynamic" and seq_len is not None and seq_len > spec.max_positions:
        factor = scaling["factor"]
        theta = theta * ((factor * seq_len / spec.max_positions) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (theta ** exponents)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


# ----------------------------------------------------------------------------------------------------
# The family contract: build, load, synthesize, size


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise UnsupportedError(f"dtype {dtype!r} is not supported for decoder models (float32, bfloat16, float16)")


def _build(spec: ModelSpec, dtype: str | torch.dtype, device: str | torch.device) -> Decoder:
    """The model with uninitialized weights in `dtype` on `device`, never allocated twice."""
    with torch.device("meta"):
        model = Decoder(spec)
    model = model.to(_torch_dtype(dtype)).to_empty(device=torch.device(device))
    model.tie_weights()     # to_empty gives each module its own new tensor, breaking the tie
    model.init_rotary()
    return model.eval().requires_grad_(False)


def load(spec: ModelSpec, reader: CheckpointReader, dtype: str | torch.dtype = "float32",
         device: str | torch.device = "cpu") -> Decoder:
    """The model with the checkpoint's weights, read and converted one tensor at a time."""
    model = _build(spec, dtype, device)
    parameters = dict(model.named_parameters())
    filled: dict[str, int] = {}
    with torch.no_grad():
        for source in checkpoint_plan(spec, reader):
            tensor = reader.read(source.name, source.shape)
            if source.transpose:
                tensor = tensor.t()
            if source.skip_rows:
                tensor = tensor[source.skip_rows:]
            target = parameters[source.parameter]
            if source.rows is not None:
                target = target[source.rows[0]:source.rows[1]]
            target.copy_(tensor)
            filled[source.parameter] = filled.get(source.parameter, 0) + target.numel()
            del tensor
    unfilled = [name for name, p in parameters.items() if filled.get(name, 0) != p.numel()]
    if unfilled:  # a mapping bug, not a user's mistake, but never run on uninitialized memory
        raise CheckpointError(f"{reader.directory}: no checkpoint tensor for {', '.join(unfilled)}")
    return model


def synthetic(spec: ModelSpec, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
              seed: int = 0) -> Decoder:
    """Random weights (normal, std 0.02; norms 1, biases 0), the same for a seed on any device and dtype."""
    model = _build(dataclasses.replace(spec, synthetic=True), dtype, device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.dim() == 1:
                parameter.fill_(1.0)
            else:
                # drawn in float32 on the CPU, one matrix at a time, so values do not depend on dtype/device
                parameter.copy_(torch.empty(parameter.shape).normal_(0.0, 0.02, generator=generator))
    return model


def weight_sizes(spec: ModelSpec) -> dict[str, int]:
    with torch.device("meta"):
        count = sum(p.numel() for p in Decoder(spec).parameters())
    return {name: count * dtype.itemsize for name, dtype in _DTYPES.items()}
