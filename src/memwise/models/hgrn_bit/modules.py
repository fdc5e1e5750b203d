"""HGRN-Bit, the MatMul-free language model (ridger/MMfreeLM-*), as torch modules over 2-bit packed weights.

What the model computes is fixed by the released checkpoints' reference code: every projection is a
BitLinear (RMSNorm with its own gain, int8 activations per token, ternary weights with one scale per
matrix); the token mixer is a gated linear recurrence with one float32 state per channel; the
channel mixer is a GLU. The model never holds a latent (full-precision) weight matrix, only packed
codes (memwise.kernels.packed); the embedding stays in its stored dtype and only gathered rows
become float32. All arithmetic is float32.

This PyTorch code is the model's specification; on CPUs a decode step runs instead as one C call
(fused_step.FusedDecoder), checked against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
import torch.nn.functional as F

from memwise import kernels
from memwise.errors import UnsupportedError
from memwise.heap import keep_freed_memory
from memwise.kernels.packed import TernaryMatrix, rmsnorm
from memwise.kernels.threads import CpuBudget
from memwise.models.hgrn_bit import fused_step
from memwise.models.hgrn_bit.config import recurrence_width
from memwise.spec import ModelSpec

# The kernel backends, plus "c-unfused": the C kernels one BitLinear at a time even for decode
# steps, which "auto" and "c" run as one fused C call per token (fused_step).
BACKENDS = kernels.BACKENDS + ("c-unfused",)

# A CPU forward over many tokens feeds them in slices whose widest activation (the gate/up output,
# 2 x intermediate_size floats per token) stays under this many bytes; see HGRNBitForCausalLM.forward.
PREFILL_SLICE_BYTES = 8 << 20


class BitLinear(nn.Module):
    """A ternary projection: packed codes, their scale m, and the gain of the RMSNorm on its input."""

    def __init__(self, weight: TernaryMatrix, norm_weight: torch.Tensor, eps: float):
        super().__init__()
        if tuple(norm_weight.shape) != (weight.cols,):
            raise ValueError(f"norm gain of shape {tuple(norm_weight.shape)} for a matrix with {weight.cols} inputs")
        self.register_buffer("packed", weight.packed)
        self.register_buffer("norm_weight", norm_weight)
        self.scale = weight.scale
        self.rows = weight.rows
        self.cols = weight.cols
        self.eps = eps

    @property
    def weight(self) -> TernaryMatrix:
        return TernaryMatrix(self.packed, self.scale, self.rows, self.cols)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return kernels.bitlinear(x, self.norm_weight, self.eps, self.weight, backend)


class Gain(nn.Module):
    """The weight of an RMSNorm (float32), kept as a module so its name matches the checkpoint's."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)


class MLGRU(nn.Module):
    """The token mixer: gated linear recurrence over channels, output gated by silu(state)."""

    def __init__(self, i_proj: BitLinear, f_proj: BitLinear, g_proj: BitLinear, g_norm: Gain,
                 o_proj: BitLinear, num_heads: int, eps: float):
        super().__init__()
        self.i_proj, self.f_proj, self.g_proj, self.o_proj = i_proj, f_proj, g_proj, o_proj
        self.g_norm = g_norm
        self.num_heads = num_heads
        self.eps = eps

    def forward(self, h: torch.Tensor, state: torch.Tensor, lower_bound: torch.Tensor | None,
                mask: torch.Tensor | None, backend: str) -> torch.Tensor:
        i = self.i_proj(h, backend)
        f = torch.sigmoid(self.f_proj(h, backend))
        if lower_bound is not None:
            f = lower_bound + (1 - lower_bound) * f
        c = F.silu(i) * (1 - f)
        if mask is not None:
            c = c * mask.unsqueeze(-1)      # state stays 0 through left padding
        states = recurrence(f, c, state)
        g = self.g_proj(h, backend)
        shape = g.shape
        g = rmsnorm(g.view(*shape[:-1], self.num_heads, -1), self.g_norm.weight, self.eps).view(shape)
        return self.o_proj(g * F.silu(states), backend)


def recurrence(f: torch.Tensor, c: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """state_t = f_t * state_{t-1} + c_t over T for f, c [B, T, D]; updates `state` [B, D] in place.

    Returns every state_t as [B, T, D]. Sequential in float32: the loop runs time-major so that each
    step is one fused multiply-add over a contiguous [B, D] slice.
    """
    if c.shape[1] == 1:
        state.mul_(f[:, 0]).add_(c[:, 0])
        return state.unsqueeze(1).clone()
    ct = c.transpose(0, 1).contiguous()
    ft = f.transpose(0, 1).contiguous()
    ct[0].addcmul_(ft[0], state)
    for t in range(1, ct.shape[0]):
        ct[t].addcmul_(ft[t], ct[t - 1])
    state.copy_(ct[-1])
    return ct.transpose(0, 1)


class GLU(nn.Module):
    """The channel mixer: one [2I, H] ternary matrix (one scale), silu(gate) * up, then down."""

    def __init__(self, gate_proj: BitLinear, down_proj: BitLinear):
        super().__init__()
        self.gate_proj, self.down_proj = gate_proj, down_proj

    def forward(self, h: torch.Tensor, backend: str) -> torch.Tensor:
        gate, up = self.gate_proj(h, backend).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, backend)


class HGRNBitBlock(nn.Module):
    def __init__(self, attn_norm: Gain, attn: MLGRU, mlp_norm: Gain, mlp: GLU, eps: float):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
        self.eps = eps

    def forward(self, x: torch.Tensor, state: torch.Tensor, lower_bound: torch.Tensor | None,
                mask: torch.Tensor | None, backend: str) -> torch.Tensor:
        x = x + self.attn(rmsnorm(x, self.attn_norm.weight, self.eps), state, lower_bound, mask, backend)
        return x + self.mlp(rmsnorm(x, self.mlp_norm.weight, self.eps), backend)


@dataclass
class RecurrentCache:
    """Generation state: one float32 vector per layer per sequence, whatever the sequence length."""

    state: torch.Tensor     # [layers, batch, hidden_size * expand_ratio]
    length: int = 0         # tokens consumed so far


class HGRNBitForCausalLM(nn.Module):
    """The model; `backend` (one of BACKENDS: "auto", "c", "c-unfused", "triton", "reference") picks
    the BitLinear implementation. On CPU with the C extension, "auto" and "c" run each decode step
    (one token per sequence) as one fused C call (fused_step); "c-unfused" keeps the
    per-BitLinear path for every step."""

    def __init__(self, spec: ModelSpec, embeddings: torch.Tensor, lower_bounds: torch.Tensor | None,
                 layers: list[HGRNBitBlock], norm: Gain, lm_head: BitLinear):
        super().__init__()
        self.spec = spec
        self.register_buffer("embeddings", embeddings)
        # Per layer: softmax over layers, cumulative sum, minus the first (layer 0 gets 0, and the
        # reference code does not apply a bound there at all).
        self.register_buffer("lower_bounds", lower_bounds)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.backend = "auto"
        self._fused_decoder = None
        # Threads for the cores other processes leave free, for prefill and the fused decode alike.
        self._cpu_budget = CpuBudget()
        # Tokens (batch x positions) per slice of a long CPU forward.
        self.slice_tokens = max(1, PREFILL_SLICE_BYTES // (8 * spec.intermediate_size))
        if embeddings.device.type == "cpu":
            keep_freed_memory()   # the slices' activations then stay in reused heap memory

    def _apply(self, fn, *args, **kwargs):
        # .to(), .float() and friends may replace the buffers the fused plan points into.
        self._fused_decoder = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # The fused decoder holds raw pointers into this instance's buffers: copies build their own.
        return {**super().__getstate__(), "_fused_decoder": None}

    def _fused_step(self, input_ids: torch.Tensor, cache: "RecurrentCache") -> Any:
        """The fused decoder when this step can use it (one token, CPU, backend auto or c), else None."""
        if (input_ids.shape[1] != 1 or self.backend not in ("auto", "c")
                or not fused_step.available() or input_ids.device.type != "cpu"
                or self.embeddings.device.type != "cpu" or not cache.state.is_contiguous()
                or cache.state.dtype != torch.float32):
            return None
        if self._fused_decoder is None:
            self._fused_decoder = fused_step.FusedDecoder(self, self._cpu_budget)
        return self._fused_decoder

    def new_cache(self, batch_size: int, max_length: int = 0) -> RecurrentCache:
        """Zero state for `batch_size` sequences; `max_length` is not needed (memory is constant)."""
        width = recurrence_width(self.spec)
        return RecurrentCache(torch.zeros((self.spec.num_layers, batch_size, width), dtype=torch.float32,
                                          device=self.embeddings.device))

    def cache_bytes(self, batch_size: int, max_length: int = 0) -> int:
        """What new_cache allocates: constant in the sequence length."""
        return self.spec.num_layers * batch_size * recurrence_width(self.spec) * 4

    def forward(self, input_ids: torch.Tensor, cache: RecurrentCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """float32 logits [B, T or 1, V]; advances `cache` by T tokens (a fresh state when None)."""
        if self.backend not in BACKENDS:
            raise UnsupportedError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        batch, length = input_ids.shape
        if cache is None:
            cache = self.new_cache(batch)
        elif cache.state.shape[1] != batch:
            raise ValueError(f"cache holds {cache.state.shape[1]} sequences, input_ids has {batch}")
        if attention_mask is not None:
            # Only the mask of the positions being fed matters to a recurrence.
            attention_mask = attention_mask[:, -length:]
        most = max(1, self.slice_tokens // max(batch, 1))   # positions per slice
        if length > most and input_ids.device.type == "cpu":
            with self._cpu_budget.torch_threads():
                return self._forward_slices(input_ids, cache, attention_mask, last_only, most)
        # The mask is applied even when all True: testing that would cost a device
        # synchronization per step on CUDA.
        mask = None if attention_mask is None else attention_mask.to(torch.float32)
        decoder = self._fused_step(input_ids, cache)
        if decoder is not None:
            logits = decoder.step(input_ids, cache.state, None if mask is None else mask[:, 0])
            cache.length += length
            return logits
        if input_ids.device.type != "cpu":
            return self._layers_and_head(input_ids, cache, mask, last_only)
        with self._cpu_budget.torch_threads():
            return self._layers_and_head(input_ids, cache, mask, last_only)

    def _layers_and_head(self, input_ids: torch.Tensor, cache: RecurrentCache, mask: torch.Tensor | None,
                         last_only: bool) -> torch.Tensor:
        x = self._layers(input_ids, cache, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(rmsnorm(x, self.norm.weight, self.spec.norm_eps), self._product_backend())

    def _product_backend(self) -> str:
        return "c" if self.backend == "c-unfused" else self.backend

    def _layers(self, input_ids: torch.Tensor, cache: RecurrentCache, mask: torch.Tensor | None) -> torch.Tensor:
        """The hidden states after the last layer, [B, T, H]; advances `cache` by T tokens."""
        backend = self._product_backend()
        x = self.embeddings[input_ids].float()
        for n, layer in enumerate(self.layers):
            bound = self.lower_bounds[n] if self.lower_bounds is not None and n > 0 else None
            x = layer(x, cache.state[n], bound, mask, backend)
        cache.length += input_ids.shape[1]
        return x

    def _forward_slices(self, input_ids: torch.Tensor, cache: RecurrentCache,
                        attention_mask: torch.Tensor | None, last_only: bool, most: int) -> torch.Tensor:
        """The forward of many tokens on CPU, in equal slices of at most `most` positions.

        A whole prompt at once takes tens of MB per activation (16 x 128 tokens of mmfree-370m: 92 MB
        for the gate/up output). glibc hands blocks that large back to the kernel when they are
        freed, so every layer faulted its pages in afresh: about a million page faults and half the
        time of that prefill. Slices small enough to stay in reused heap memory (memwise.heap) and in
        cache avoid it. The recurrence carries its state from one slice to the next and every other
        operation works token by token, so the logits are those of one pass."""
        length = input_ids.shape[1]
        count = -(-length // most)
        size = -(-length // count)
        outputs = []
        for start in range(0, length, size):
            end = min(start + size, length)
            ids = input_ids[:, start:end]
            mask = None if attention_mask is None else attention_mask[:, start:end]
            if last_only and end < length:
                self._layers(ids, cache, None if mask is None else mask.to(torch.float32))
            else:
                outputs.append(self(ids, cache, mask, last_only=last_only))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def ternary_layers(self) -> Iterator[tuple[str, BitLinear]]:
        """(released name of the matrix, e.g. 'model.layers.0.attn.i_proj.weight', module)."""
        for name, module in self.named_modules():
            if isinstance(module, BitLinear):
                yield (name if name == "lm_head" else "model." + name) + ".weight", module

    def weights_bytes(self) -> int:
        held = sum(b.numel() * b.element_size() for b in self.buffers())
        return held + 4 * sum(1 for _ in self.ternary_layers())

    def decode_bytes_per_token(self) -> int:
        """What one decode step reads: everything but the embedding table, of which it reads one row."""
        return self.weights_bytes() - self.embeddings.numel() * self.embeddings.element_size()
