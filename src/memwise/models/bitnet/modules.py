"""BitNet b1.58 (microsoft/bitnet-b1.58-2B-4T) as torch modules over 2-bit packed weights.

What transformers' BitNetForCausalLM computes with AutoBitLinear projections, per layer:

    h = x + o_proj(attn_sub_norm(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))))
        where n = input_layernorm(x)
    x' = h + down_proj(ffn_sub_norm(relu(gate_proj(m))^2 * up_proj(m)))   where m = post_attention_layernorm(h)

then logits = lm_head(norm(x)), the lm_head full precision. 1bitLLM's Llama-shaped models compute the
same with silu in place of relu^2 (and other names for the sub-norms). Every projection is ternary: t * m with one
scale m per matrix, applied to int8 activations quantized per token (s = 127 / max|y|), and every one
of them reads the output of an RMSNorm. So each projection here is RMSNorm -> int8 -> exact integer
product -> one rescale (memwise.kernels), and the matrices that read the same norm (q, k, v; gate,
up) share one quantization and one product over their stacked rows. Attention (float32, grouped
query, over a preallocated KV cache with left padding) is the decoder family's.

A decode step of one sequence (one token, no padding in the cache) on CPU with the C extension runs
all layers as one C call (fused_step.py) under the backends "auto" and "c"; "c-unfused" keeps
these modules for every step, with the C products.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from memwise import kernels
from memwise.kernels import bf16
from memwise.kernels.packed import TernaryMatrix, rmsnorm
from memwise.kernels.threads import CpuBudget
from memwise.models.bitnet import fused_step
from memwise.models.decoder.cache import DecoderCache, decoder_cache_bytes, new_decoder_cache
from memwise.models.decoder.modules import Attention, attention_mask_for, rotary_angles, rotary_inv_freq
from memwise.spec import ModelSpec

# The kernel backends, plus "c-unfused": the C products through these modules even for the decode
# steps that "auto" and "c" run as one fused C call.
BACKENDS = kernels.BACKENDS + ("c-unfused",)

# The full-precision lm_head of a bf16 checkpoint is made float32 this many weights at a time, so
# the logits are float32 products without a float32 copy of the whole matrix (1.3 GB for 2B-4T).
LOGITS_CHUNK_ELEMENTS = 1 << 22


class TernaryProjection(nn.Module):
    """Ternary matrices over the same input, stacked by rows: RMSNorm with the gain `norm_weight`,
    int8 per token, one exact integer product, then each output times its matrix's m / s."""

    def __init__(self, packed: torch.Tensor, cols: int, scales: list[float], rows: list[int],
                 norm_weight: torch.Tensor, eps: float):
        super().__init__()
        if tuple(norm_weight.shape) != (cols,):
            raise ValueError(f"norm gain of shape {tuple(norm_weight.shape)} for matrices with {cols} inputs")
        self.register_buffer("packed", packed)
        self.register_buffer("norm_weight", norm_weight)
        self.register_buffer("row_scales", torch.cat([torch.full((n,), m) for m, n in zip(scales, rows)]))
        self.scales, self.rows, self.cols, self.eps = scales, rows, cols, eps
        self.backend = "auto"

    def weight(self, index: int | None = None) -> TernaryMatrix:
        """The stacked matrix (scale 1: each row has its own), or matrix `index` with its scale."""
        if index is None:
            return TernaryMatrix(self.packed, 1.0, sum(self.rows), self.cols)
        start = sum(self.rows[:index])
        return TernaryMatrix(self.packed[start:start + self.rows[index]], self.scales[index], self.rows[index],
                             self.cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.rows) == 1:     # the C kernel fuses norm, quantization, product and rescale
            return kernels.bitlinear(x, self.norm_weight, self.eps, self.weight(0), self.backend)
        flat = x.reshape(-1, self.cols)
        q, s = kernels.quantize_rows(flat, self.norm_weight, self.eps, self.backend)
        acc = kernels.ternary_matmul(q, self.weight(), backend=self.backend)
        return (acc.float() * (self.row_scales / s)).reshape(*x.shape[:-1], sum(self.rows))


class GatedMLP(nn.Module):
    """The channel mixer: act(gate) * up, then down (its sub-norm fused in); act is relu(x)^2
    ("relu2", 2B-4T) or silu (1bitLLM)."""

    def __init__(self, gate_up: TernaryProjection, down: TernaryProjection, activation: str):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        gate = F.relu(gate).square() if self.activation == "relu2" else F.silu(gate)
        return self.down(gate * up)


class BitNetBlock(nn.Module):
    """A layer; the pre-norms are inside the projections that read them."""

    def __init__(self, attn: Attention, mlp: GatedMLP):
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x: torch.Tensor, rope, cache: DecoderCache, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        x = x + self.attn(x, rope, cache, mask, causal)
        return x + self.mlp(x)


class BitNetForCausalLM(nn.Module):
    """The model: embedding and lm_head in their stored dtype, packed ternary layers, float32 compute.

    `backend` (one of BACKENDS) picks the kernels of every ternary product."""

    def __init__(self, spec: ModelSpec, embeddings: torch.Tensor, layers: list[BitNetBlock], norm: torch.Tensor,
                 lm_head: torch.Tensor | None):
        super().__init__()
        self.spec = spec
        self.register_buffer("embeddings", embeddings)
        self.layers = nn.ModuleList(layers)
        self.register_buffer("norm", norm)
        self.register_buffer("lm_head", lm_head)      # None: tied to the embeddings
        self.register_buffer("inv_freq", rotary_inv_freq(spec, device=embeddings.device), persistent=False)
        self._backend = "auto"
        self._fused_decoder = None
        self._cpu_budget = CpuBudget()

    def _apply(self, fn, *args, **kwargs):
        # .to(), .float() and friends may replace the buffers the fused decoder points into.
        self._fused_decoder = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # The fused decoder holds raw pointers into this instance's buffers: copies build their own.
        return {**super().__getstate__(), "_fused_decoder": None}

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise kernels.KernelInputError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
        self._backend = name
        for module in self.modules():
            if isinstance(module, TernaryProjection):
                module.backend = "c" if name == "c-unfused" else name

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    kv_cache: str | None = None    # a kv_quant scheme, set at load (memwise.load(kv_cache=...))

    def new_cache(self, batch_size: int, max_length: int) -> DecoderCache:
        return new_decoder_cache(self.spec, batch_size, max_length, torch.float32, self.device, self.kv_cache)

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        """What new_cache(batch_size, max_length) allocates, computed without allocating it."""
        return decoder_cache_bytes(self.spec, batch_size, max_length, torch.float32, self.kv_cache)

    def forward(self, input_ids: torch.Tensor, cache: DecoderCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        if cache is None:
            cache = self.new_cache(*input_ids.shape)
        decoder = self._fused_step(input_ids, cache, attention_mask)
        if decoder is not None:
            cache.begin(input_ids, attention_mask)
            x = decoder.step(self.embeddings[input_ids].float(), cache)
            cache.length += 1
            return self._logits(rmsnorm(x, self.norm, self.spec.norm_eps))
        start, length = cache.length, input_ids.shape[1]
        positions = cache.begin(input_ids, attention_mask)
        rope = rotary_angles(positions, self.inv_freq.to(input_ids.device), torch.float32)
        mask, causal = attention_mask_for(cache, start, length, None)
        x = self.embeddings[input_ids].float()
        for layer in self.layers:
            x = layer(x, rope, cache, mask, causal)
        cache.length = start + length
        if last_only:
            x = x[:, -1:]
        return self._logits(rmsnorm(x, self.norm, self.spec.norm_eps))

    def _fused_step(self, input_ids: torch.Tensor, cache: DecoderCache,
                    attention_mask: torch.Tensor | None) -> Any:
        """The fused decoder when this step can use it (one token of one sequence, no padding in the
        cache nor in this token, CPU, float32 cache (not a quantized one), backend auto or c), else None."""
        if (input_ids.shape != (1, 1) or self._backend not in ("auto", "c") or not fused_step.available()
                or input_ids.device.type != "cpu" or self.embeddings.device.type != "cpu" or cache.padded
                or cache.batch_size != 1 or cache.length >= cache.max_length or cache.scheme is not None
                or cache.keys[0].dtype != torch.float32
                or (attention_mask is not None and not bool(attention_mask.all()))):
            return None
        if self._fused_decoder is None:
            self._fused_decoder = fused_step.FusedDecoder(self, self._cpu_budget)
        return self._fused_decoder

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        head = self.embeddings if self.lm_head is None else self.lm_head
        if head.dtype == torch.float32:
            return F.linear(x, head)
        if head.dtype == torch.bfloat16 and x.device.type == "cpu" and x[..., 0].numel() <= bf16.MAX_ROWS:
            return bf16.bf16_linear(x.contiguous(), head)     # a decode step: the head read once, at 2 bytes
        out = torch.empty((*x.shape[:-1], head.shape[0]), dtype=torch.float32, device=x.device)
        step = max(1, LOGITS_CHUNK_ELEMENTS // head.shape[1])
        for r in range(0, head.shape[0], step):
            out[..., r:r + step] = F.linear(x, head[r:r + step].float())
        return out

    def ternary_layers(self) -> Iterator[tuple[str, TernaryProjection]]:
        for name, module in self.named_modules():
            if isinstance(module, TernaryProjection):
                yield name, module

    def weights_bytes(self) -> int:
        held = sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if not name.endswith(("row_scales", "inv_freq")))
        return held + 4 * sum(len(module.rows) for _, module in self.ternary_layers())

    def decode_bytes_per_token(self) -> int:
        """What one decode step reads: everything but the embedding, of which it reads one row (a tied
        embedding is read whole by the lm_head)."""
        if self.lm_head is None:
            return self.weights_bytes()
        return self.weights_bytes() - self.embeddings.numel() * self.embeddings.element_size()
