"""The Decoder (the family's CausalLM) and its parts: attention over a preallocated KV cache
(cache.py), MLP, norms, rotary."""
from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memwise.errors import UnsupportedError
from memwise.models.decoder import fused_step
from memwise.models.decoder.block_schedule import MicroBatchCache, block_forward, micro_batch_rows
from memwise.models.decoder.cache import DecoderCache, decoder_cache_bytes, new_decoder_cache
from memwise.spec import ModelSpec


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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    swapped = torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1)
    rotated = rotated * cos + swapped * sin
    return rotated if passed.shape[-1] == 0 else torch.cat((rotated, passed), dim=-1)


class Attention(nn.Module):
    """Self-attention over the cache. `qkv` and `out` are linear layers unless given: another family
    (bitnet) passes its own projections, and the rest of attention is this."""

    def __init__(self, spec: ModelSpec, layer: int, qkv: nn.Module | None = None, out: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.split = (q, kv, kv)
        self.qkv = qkv if qkv is not None else nn.Linear(spec.hidden_size, q + 2 * kv, bias=spec.attention_bias)
        self.out = out if out is not None else nn.Linear(q, spec.hidden_size, bias=spec.attention_out_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: DecoderCache,
                mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(y.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


# Prompt tokens a quantized MLP runs at once: its intermediate activations ([tokens, intermediate]
# float32, the int8 copy, the activation's output) are the largest temporaries of a prefill.
MLP_TOKEN_CHUNK = 32


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.activation, self.gated = spec.activation, spec.gated_mlp
        inner = spec.intermediate_size
        # gated: one matrix holds gate (first half of the rows) and up (second half)
        self.up = nn.Linear(spec.hidden_size, 2 * inner if self.gated else inner, bias=spec.mlp_bias)
        self.down = nn.Linear(inner, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[-2] if x.dim() >= 2 else 1
        if tokens > MLP_TOKEN_CHUNK and getattr(self.up, "per_token_exact", False) \
                and getattr(self.down, "per_token_exact", False):
            # a prompt through int8/int4 layers in token chunks: the same rows (the products work token by
            # token), with the intermediate activations of a chunk, not of the prompt, resident at once
            return torch.cat([self._tokens(x[..., at:at + MLP_TOKEN_CHUNK, :])
                              for at in range(0, tokens, MLP_TOKEN_CHUNK)], dim=-2)
        return self._tokens(x)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
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


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """An nn.Embedding without its random init. Every load fills the table, and nn.Embedding's init
    (init.normal_) on the meta device goes through torch._refs, whose import of torch._dynamo (and
    triton with it) added 144 MiB to the resident set of every decoder process (opt-2.7b: 372 MiB
    baseline instead of 228)."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class Decoder(nn.Module):
    """A decoder-only Transformer described by a ModelSpec; the family's CausalLM."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        hidden, embed = spec.hidden_size, spec.embed_dim or spec.hidden_size
        self.embed = _embedding(spec.vocab_size, embed)
        self.project_in = nn.Linear(embed, hidden, bias=False) if embed != hidden else None
        self.positions = _embedding(spec.max_positions, hidden) if spec.positions == "learned" else None
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = _norm(spec, hidden) if spec.final_norm else None
        self.project_out = nn.Linear(hidden, embed, bias=False) if embed != hidden else None
        self.lm_head = nn.Linear(embed, spec.vocab_size, bias=spec.lm_head_bias)
        self.tie_weights()
        self.inv_freq: torch.Tensor | None = None
        # set by an offloaded load (memwise.offload): yields each layer with its weights read in
        self.layer_stream = None
        # set by an offloaded load: solves and applies the plan before a generation (memwise.offload.runtime)
        self.offload_runtime = None
        self.kv_cache: str | None = None    # a kv_quant scheme, set at load (memwise.load(kv_cache=...))
        # sequences per micro-batch of the block schedule (block_schedule.py); None: the batch is one
        self.micro_batch_size: int | None = None
        # fused_step.FusedDecoder once built, False where this model has none; None: not decided yet
        self._fused_decoder: Any = None

    def _apply(self, fn, *args, **kwargs):
        # .to(), .float() and friends may replace the tensors the fused decoder points into.
        self._fused_decoder = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # The fused decoder holds raw pointers into this instance's tensors: copies build their own.
        return {**super().__getstate__(), "_fused_decoder": None}

    def tie_weights(self) -> None:
        if not self.spec.tie_word_embeddings:
            return
        if isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed.weight
            return
        # quantized (quantized.py): the int8 lm_head and the int8 embedding are one set of tensors
        for name, tensor in self.embed.named_buffers(recurse=False):
            setattr(self.lm_head, name, tensor)

    def init_rotary(self) -> None:
        """Rotary frequencies in float32 on the model's device (kept out of the state dict and of .to(dtype))."""
        if self.spec.positions == "rotary":
            self.inv_freq = rotary_inv_freq(self.spec, device=self.embed.weight.device)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # a quantized embedding stores int8 rows and returns them in the model's dtype
        return getattr(self.embed, "output_dtype", self.embed.weight.dtype)

    def new_cache(self, batch_size: int, max_length: int) -> DecoderCache:
        """One cache, or, when micro_batch_size is set and the batch is larger, one per micro-batch
        (a MicroBatchCache, which makes forward run the block schedule)."""
        if self.spec.positions == "learned" and max_length > self.spec.max_positions:
            raise UnsupportedError(f"{self.spec.model_type}: {max_length} tokens (prompt + new tokens) exceed the "
                                   f"model's {self.spec.max_positions} learned positions")
        size = self.micro_batch_size
        if size is None or size >= batch_size:
            return new_decoder_cache(self.spec, batch_size, max_length, self.dtype, self.device, self.kv_cache)
        return MicroBatchCache([new_decoder_cache(self.spec, rows, max_length, self.dtype, self.device, self.kv_cache)
                                for rows in micro_batch_rows(batch_size, size)])

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        """What new_cache(batch_size, max_length) allocates, computed without allocating it."""
        rows = [batch_size] if self.micro_batch_size is None else micro_batch_rows(batch_size, self.micro_batch_size)
        return sum(decoder_cache_bytes(self.spec, n, max_length, self.dtype, self.kv_cache) for n in rows)

    def weights_bytes(self) -> int:
        """Parameters and buffers (the int8 linears keep their weights as buffers)."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: all but the embedding tables, of which it reads one row
        (an input embedding tied to the lm_head is read whole by the lm_head)."""
        skipped = [] if self.spec.tie_word_embeddings else [*self.embed.parameters(), *self.embed.buffers()]
        if self.positions is not None:
            skipped.append(self.positions.weight)
        return self.weights_bytes() - sum(p.numel() * p.element_size() for p in skipped)

    def forward(self, input_ids: torch.Tensor, cache: DecoderCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        if isinstance(cache, MicroBatchCache):
            return block_forward(self, input_ids, cache, attention_mask, last_only)
        batch, length = input_ids.shape
        if cache is None:
            cache = self.new_cache(batch, length)
        decoder = self._fused_step(input_ids, cache, attention_mask)
        if decoder is not None:
            x = decoder.step(self.enter(input_ids, cache, attention_mask)[0], cache)
            cache.length += 1
            return self.head(x, last_only)
        x, rope, mask, causal = self.enter(input_ids, cache, attention_mask)
        layers = self.layers if self.layer_stream is None else self.layer_stream.layers(self.layers)
        for layer in layers:
            x = layer(x, rope, cache, mask, causal)
        cache.length += length
        return self.head(x, last_only)

    def _fused_step(self, input_ids: torch.Tensor, cache: DecoderCache,
                    attention_mask: torch.Tensor | None) -> Any:
        """The fused decoder (fused_step.py) when this step can use it: one token of one sequence on the
        CPU, a float32 DecoderCache (not quantized, paged or micro-batched) without padding and, with a
        sliding window, shorter than the window, the model in memory (not offloaded) and of a shape
        fused_step supports; MEMWISE_FUSED_STEP=0 turns it off (for A/B measurements). Else None."""
        window = self.spec.sliding_window
        if (self._fused_decoder is False or input_ids.shape != (1, 1) or type(cache) is not DecoderCache
                or (window is not None and cache.length >= window)
                or cache.padded or cache.length >= cache.max_length or cache.keys[0].dtype != torch.float32
                or cache.keys[0].device.type != "cpu" or input_ids.device.type != "cpu"
                or self.layer_stream is not None or self.offload_runtime is not None
                or (attention_mask is not None and not bool(attention_mask.all()))
                or os.environ.get("MEMWISE_FUSED_STEP", "1") == "0"):
            return None
        if self._fused_decoder is None:
            if not fused_step.available() or not fused_step.supports(self):
                self._fused_decoder = False
                return None
            self._fused_decoder = fused_step.FusedDecoder(self, getattr(self.layers[0].attn.qkv, "budget", None))
        return self._fused_decoder

    def enter(self, input_ids: torch.Tensor, cache: DecoderCache, attention_mask: torch.Tensor | None):
        """The new tokens recorded in `cache` and embedded: (x, rope, mask, causal) for the layers."""
        length = input_ids.shape[1]
        start = cache.length
        positions = cache.begin(input_ids, attention_mask)
        x = self.embed(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        rope = None
        if self.positions is not None:
            x = x + self.positions(positions)
        else:
            rope = self._rope(positions, x.dtype)
        mask, causal = attention_mask_for(cache, start, length, self.spec.sliding_window)
        return x, rope, mask, causal

    def head(self, x: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Float32 logits of the last layer's output (of its last position only with `last_only`)."""
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
        return rotary_angles(positions, inv_freq, dtype)


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, 1, T, rotary_dim] of positions [B, T] for `rotate`."""
    freqs = positions[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def attention_mask_for(cache: DecoderCache, start: int, length: int,
                       window: int | None) -> tuple[torch.Tensor | None, bool]:
    """(boolean mask [B, 1, T, S] or None, is_causal) for the new tokens against all slots so far."""
    end = start + length
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

