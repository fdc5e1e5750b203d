"""HGRN-Bit, the MatMul-free language model (ridger/MMfreeLM-*), with 2-bit packed ternary weights.

What the model computes is fixed by the released checkpoints' reference code (summarized in the
project's HGRN-Bit notes): every projection is a BitLinear (RMSNorm with its own gain, int8
activations per token, ternary weights with one scale per matrix); the token mixer is a gated linear
recurrence with one float32 state per channel; the channel mixer is a GLU.

Memory is the point of this family. The model never holds a latent (full-precision) weight matrix:
each one is read from the checkpoint, ternarized exactly once and packed at 2 bits per weight
(memwise.ternary), then freed. The embedding stays in its stored dtype (bf16 in the released
checkpoints, lossless and half the size of float32) and only gathered rows become float32. All
arithmetic is float32.

Checkpoints come in two layouts, told apart by the safetensors metadata:

* latent (as released): `NAME.weight` float matrices, quantized at load;
* packed (written by `memwise convert`, metadata format "memwise-ternary"): `NAME.weight.packed` and
  `NAME.weight.scale` per ternary matrix, read as they are (quantizing again would change the scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
import torch.nn.functional as F

from memwise.checkpoint import CheckpointReader
from memwise.errors import CheckpointError, ConfigError, UnsupportedError
from memwise.heap import keep_freed_memory
from memwise.spec import ModelSpec, eos_ids, require
from memwise.ternary import (BLOCK, BLOCK_BYTES, SCALE_FLOOR, TernaryMatrix, bitlinear_reference, codes_buffer,
                             pack_ternary, padded_cols, rmsnorm)

try:
    from memwise.kernels import BACKENDS as _KERNEL_BACKENDS
    from memwise.kernels import bitlinear as _kernel_bitlinear
    from memwise.kernels import fused as _fused
except ImportError:     # the package still works, slower, on the PyTorch reference alone
    _KERNEL_BACKENDS = ("auto", "reference")
    _kernel_bitlinear = None
    _fused = None

# The kernel backends, plus "c-unfused": the C kernels one BitLinear at a time even for decode
# steps, which "auto" and "c" run as one fused C call per token (memwise.kernels.fused).
BACKENDS = tuple(_KERNEL_BACKENDS) + ("c-unfused",)

MODEL_TYPES = ("hgrn_bit",)

PACKED_FORMAT = "memwise-ternary"
PACKED_FORMAT_VERSION = "1"
PACKED_SUFFIX = ".packed"       # NAME.weight.packed: uint8 [rows, padded_cols(cols) / 4]
SCALE_SUFFIX = ".scale"         # NAME.weight.scale: float32, shape []

# Row chunks of about this many weights bound the float32 temporaries of quantization, so loading
# never holds more than the one latent tensor plus a few MB.
_CHUNK_ELEMENTS = 1 << 20

# A CPU forward over many tokens feeds them in slices whose widest activation (the gate/up output,
# 2 x intermediate_size floats per token) stays under this many bytes; see HGRNBitForCausalLM.forward.
PREFILL_SLICE_BYTES = 8 << 20


# ----------------------------------------------------------------------------------------------
# Config


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
                       ("num_heads", heads), ("expand_ratio", expand)):
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
        bos_token_id=require(config, "bos_token_id", int, where, 1),
        eos_token_ids=eos_ids(config) or (2,),
        pad_token_id=require(config, "pad_token_id", int, where, None),
        head_dim=width // heads, norm="rmsnorm", activation="silu", gated_mlp=True, positions="none",
        expand_ratio=expand, use_lower_bound=use_lower_bound)


# ----------------------------------------------------------------------------------------------
# Tensor layout


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of the released checkpoint layout: its name, shape, and whether it is ternarized."""

    name: str
    shape: tuple[int, ...]
    ternary: bool


def recurrence_width(spec: ModelSpec) -> int:
    return spec.hidden_size * spec.expand_ratio


def checkpoint_layout(spec: ModelSpec) -> list[TensorSlot]:
    """Every tensor the model reads, under its released name (ternary matrices as `NAME.weight`)."""
    h, d, i = spec.hidden_size, recurrence_width(spec), spec.intermediate_size
    slots = [TensorSlot("model.embeddings.weight", (spec.vocab_size, h), False)]
    if spec.use_lower_bound:
        slots.append(TensorSlot("model.lower_bounds", (spec.num_layers, h), False))

    def bitlinear(prefix: str, rows: int, cols: int) -> None:
        slots.append(TensorSlot(f"{prefix}.weight", (rows, cols), True))
        slots.append(TensorSlot(f"{prefix}.norm.weight", (cols,), False))

    for n in range(spec.num_layers):
        p = f"model.layers.{n}"
        slots.append(TensorSlot(f"{p}.attn_norm.weight", (h,), False))
        for proj in ("i_proj", "f_proj", "g_proj"):
            bitlinear(f"{p}.attn.{proj}", d, h)
        slots.append(TensorSlot(f"{p}.attn.g_norm.weight", (d // spec.num_heads,), False))
        bitlinear(f"{p}.attn.o_proj", h, d)
        slots.append(TensorSlot(f"{p}.mlp_norm.weight", (h,), False))
        bitlinear(f"{p}.mlp.gate_proj", 2 * i, h)
        bitlinear(f"{p}.mlp.down_proj", h, i)
    slots.append(TensorSlot("model.norm.weight", (h,), False))
    bitlinear("lm_head", spec.vocab_size, h)
    return slots


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of the released (latent) checkpoint: 374,108,160 for MMfreeLM-370M."""
    return sum(math.prod(s.shape) for s in checkpoint_layout(spec))


def packed_bytes(rows: int, cols: int) -> int:
    return rows * padded_cols(cols) // 4


def weight_sizes(spec: ModelSpec) -> dict[str, int]:
    """Bytes of weights: the latent bf16 checkpoint as released, and what the packed model holds.

    "packed 2-bit" counts what `load`/`synthetic` keep in memory: packed codes (rows padded to 128
    weights), a float32 scale per matrix, the embedding in bf16, norm gains and lower bounds in float32.
    It equals `weights_bytes()` of a model whose embedding is stored in bf16.
    """
    packed = 0
    for slot in checkpoint_layout(spec):
        if slot.ternary:
            packed += packed_bytes(*slot.shape) + 4
        elif slot.name == "model.embeddings.weight":
            packed += math.prod(slot.shape) * 2
        else:
            packed += math.prod(slot.shape) * 4
    return {"bfloat16": 2 * parameter_count(spec), "packed 2-bit": packed}


# ----------------------------------------------------------------------------------------------
# Ternarization and packing


def ternarize(weight: torch.Tensor, out: torch.Tensor | None = None) -> TernaryMatrix:
    """Quantize a latent matrix once and pack it: t = clamp(round(W / m), -1, 1), m = max(mean|W|, 1e-5).

    The same values as memwise.ternary.quantize_latent + pack_ternary, computed over row chunks: the
    whole-matrix version holds three float32 copies of the matrix at once (1 GB for a 2.7B model's
    lm_head), which would set the peak memory of loading. mean|W| is accumulated in float64, so m is
    the float32 nearest the exact mean; W / m, round (half to even) and clamp are float32 as there.
    The codes are written into `out` (uint8 [rows, padded_cols(cols) / 4], any device) when given.
    """
    if weight.dim() != 2:
        raise ValueError(f"ternarize expects a 2-d matrix, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    total = torch.zeros((), dtype=torch.float64)
    for r in range(0, rows, step):
        total += weight[r:r + step].float().abs_().sum(dtype=torch.float64)
    m = torch.tensor(float(total) / max(weight.numel(), 1), dtype=torch.float32).clamp(min=SCALE_FLOOR)
    packed = _packed_out(out, rows, cols)
    for r in range(0, rows, step):
        t = weight[r:r + step].float().div_(m).round_().clamp_(-1, 1).to(torch.int8)
        packed[r:r + step] = pack_ternary(t)
    return TernaryMatrix(packed, float(m), rows, cols)


def random_ternary(rows: int, cols: int, scale: float, generator: torch.Generator,
                   out: torch.Tensor | None = None) -> TernaryMatrix:
    """Random packed codes without any latent matrix: P(t=-1, 0, +1) = 1/4, 1/2, 1/4.

    Each 2-bit code is the sum of two random bits, so one random byte gives four codes with two masks
    and an add (no carry crosses a field: a code is at most 2).
    """
    kp = padded_cols(cols)
    packed = _packed_out(out, rows, cols)
    step = max(1, _CHUNK_ELEMENTS // kp)
    for r in range(0, rows, step):
        bits = torch.randint(0, 256, (min(step, rows - r), kp // 4), dtype=torch.uint8, generator=generator)
        packed[r:r + step] = (bits & 0x55) + ((bits >> 1) & 0x55)
    tail = cols - (kp - BLOCK)
    if tail < BLOCK:
        # The last block must hold code 1 (t = 0) in its padding, as pack_ternary writes it.
        bits = torch.randint(0, 2, (2, rows, tail), dtype=torch.int8, generator=generator)
        packed[:, -BLOCK_BYTES:] = pack_ternary(bits[0] + bits[1] - 1)
    return TernaryMatrix(packed, float(scale), rows, cols)


def _packed_out(out: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
    shape = (rows, padded_cols(cols) // 4)
    if out is None:
        return torch.empty(shape, dtype=torch.uint8)
    if tuple(out.shape) != shape or out.dtype != torch.uint8:
        raise ValueError(f"output for packed codes must be uint8 {list(shape)}, got {out.dtype} {list(out.shape)}")
    return out


def check_packed_codes(packed: torch.Tensor, cols: int, name: str, where: str) -> None:
    """Reject code 3 (not a ternary value) anywhere and non-zero weights in a row's padding."""
    step = max(1, _CHUNK_ELEMENTS // max(packed.shape[1], 1))
    for r in range(0, packed.shape[0], step):
        chunk = packed[r:r + step]
        if bool((chunk & (chunk >> 1) & 0x55).any()):
            raise CheckpointError(f"{where}: tensor '{name}' holds the invalid 2-bit code 3 "
                                  "(codes are t + 1 for t in -1, 0, 1)")
    kp = packed.shape[1] * 4
    if cols < kp:
        last = packed[:, -BLOCK_BYTES:]
        codes = torch.stack([(last >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(packed.shape[0], BLOCK)
        if bool((codes[:, BLOCK - (kp - cols):] != 1).any()):
            raise CheckpointError(f"{where}: tensor '{name}' has non-zero weights in the padding after "
                                  f"column {cols}")


# ----------------------------------------------------------------------------------------------
# Modules


def _bitlinear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: TernaryMatrix,
               backend: str) -> torch.Tensor:
    if _kernel_bitlinear is not None:
        return _kernel_bitlinear(x, norm_weight, eps, weight, backend)
    return bitlinear_reference(x, norm_weight, eps, weight)


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
        return _bitlinear(x, self.norm_weight, self.eps, self.weight, backend)


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

    @property
    def nbytes(self) -> int:
        return self.state.numel() * self.state.element_size()


class HGRNBitForCausalLM(nn.Module):
    """The model; `backend` (one of BACKENDS: "auto", "c", "c-unfused", "triton", "reference") picks
    the BitLinear implementation. On CPU with the C extension, "auto" and "c" run each decode step
    (one token per sequence) as one fused C call (memwise.kernels.fused); "c-unfused" keeps the
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
        if (input_ids.shape[1] != 1 or self.backend not in ("auto", "c") or _fused is None
                or not _fused.available() or input_ids.device.type != "cpu"
                or self.embeddings.device.type != "cpu" or not cache.state.is_contiguous()
                or cache.state.dtype != torch.float32):
            return None
        if self._fused_decoder is None:
            self._fused_decoder = _fused.FusedDecoder(self)
        return self._fused_decoder

    def new_cache(self, batch_size: int, max_length: int = 0) -> RecurrentCache:
        """Zero state for `batch_size` sequences; `max_length` is not needed (memory is constant)."""
        width = recurrence_width(self.spec)
        return RecurrentCache(torch.zeros((self.spec.num_layers, batch_size, width), dtype=torch.float32,
                                          device=self.embeddings.device))

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
            return self._forward_slices(input_ids, cache, attention_mask, last_only, most)
        # The mask is applied even when all True: testing that would cost a device
        # synchronization per step on CUDA.
        mask = None if attention_mask is None else attention_mask.to(torch.float32)
        decoder = self._fused_step(input_ids, cache)
        if decoder is not None:
            logits = decoder.step(input_ids, cache.state, None if mask is None else mask[:, 0])
            cache.length += length
            return logits
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


# ----------------------------------------------------------------------------------------------
# Building a model from a weight source


class _WeightSource:
    """Where matrices and other tensors come from: a latent or packed checkpoint, or random values.

    `matrix` writes a matrix's packed codes into `out` (a view of the model's one buffer of codes) and
    returns it with its scale; `tensor` returns any other tensor as stored.
    """

    def matrix(self, name: str, cols: int, out: torch.Tensor) -> TernaryMatrix:
        raise NotImplementedError

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


class _LatentCheckpoint(_WeightSource):
    def __init__(self, spec: ModelSpec, reader: CheckpointReader):
        self.spec, self.reader = spec, reader

    def matrix(self, name: str, cols: int, out: torch.Tensor) -> TernaryMatrix:
        latent = self.reader.read(latent_name(self.spec, self.reader, name), (out.shape[0], cols))
        if not latent.is_floating_point():
            raise CheckpointError(f"{self.reader.directory}: tensor '{name}' is {latent.dtype}, "
                                  "expected a floating-point latent matrix")
        return ternarize(latent, out)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.reader.read(name, shape)


class _PackedCheckpoint(_WeightSource):
    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def matrix(self, name: str, cols: int, out: torch.Tensor) -> TernaryMatrix:
        packed, scale = read_packed(self.reader, name, out.shape[0], cols)
        out.copy_(packed)
        return TernaryMatrix(out, float(scale), out.shape[0], cols)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.reader.read(name, shape)


class _RandomWeights(_WeightSource):
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def matrix(self, name: str, cols: int, out: torch.Tensor) -> TernaryMatrix:
        scale = 0.02 * (1 + 0.1 * float(torch.rand((), generator=self.generator)))
        return random_ternary(out.shape[0], cols, scale, self.generator, out)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name == "model.embeddings.weight":
            out = torch.empty(shape, dtype=torch.bfloat16)
            step = max(1, _CHUNK_ELEMENTS // shape[1])
            for r in range(0, shape[0], step):
                out[r:r + step] = torch.randn((min(step, shape[0] - r), shape[1]), generator=self.generator)
            return out
        if name == "model.lower_bounds":
            return torch.zeros(shape)
        return torch.ones(shape)


def latent_name(spec: ModelSpec, reader: CheckpointReader, name: str) -> str:
    """Tied checkpoints may omit lm_head.weight: the embedding is then the latent lm_head."""
    if name == "lm_head.weight" and name not in reader and spec.tie_word_embeddings:
        return "model.embeddings.weight"
    return name


def read_packed(reader: CheckpointReader, name: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`NAME.packed` (checked codes) and `NAME.scale` of a packed checkpoint, in their stored form."""
    where = str(reader.directory)
    packed = reader.read(name + PACKED_SUFFIX, (rows, padded_cols(cols) // 4))
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"{where}: tensor '{name}{PACKED_SUFFIX}' is {packed.dtype}, expected uint8")
    check_packed_codes(packed, cols, name + PACKED_SUFFIX, where)
    scale = reader.read(name + SCALE_SUFFIX, ())
    if scale.dtype != torch.float32:
        raise CheckpointError(f"{where}: tensor '{name}{SCALE_SUFFIX}' is {scale.dtype}, expected float32")
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise CheckpointError(f"{where}: tensor '{name}{SCALE_SUFFIX}' is {float(scale)}, expected a "
                              "positive finite scale")
    return packed, scale


def is_packed(reader: CheckpointReader) -> bool:
    """True for a memwise packed checkpoint (by its metadata); an unknown format version is an error."""
    where = str(reader.directory)
    if reader.metadata.get("format") != PACKED_FORMAT:
        if any(n.endswith(PACKED_SUFFIX) for n in reader.names()):
            raise CheckpointError(f"{where}: holds packed tensors ('*{PACKED_SUFFIX}') but its safetensors "
                                  f"metadata lacks format={PACKED_FORMAT!r}")
        return False
    version = reader.metadata.get("format_version")
    if version != PACKED_FORMAT_VERSION:
        raise CheckpointError(f"{where}: packed format_version {version!r} is not supported "
                              f"(this memwise reads {PACKED_FORMAT} version {PACKED_FORMAT_VERSION})")
    return True


def check_layout(spec: ModelSpec, reader: CheckpointReader, where: str, packed: bool) -> None:
    """Config fields that decide tensor shapes, checked against layer 0 and the layer count.

    A mismatch here is the config's fault more often than the tensors', so it is reported as a
    ConfigError naming the field, before any tensor is read.
    """
    config_path = f"{where}/config.json"
    names = set(reader.names())
    h, d = spec.hidden_size, recurrence_width(spec)
    i_proj = "model.layers.0.attn.i_proj.weight" + (PACKED_SUFFIX if packed else "")
    if i_proj in names:
        rows = reader.shape(i_proj)[0]
        if rows != d:
            raise ConfigError(f"{config_path}: expand_ratio {spec.expand_ratio} gives a recurrence width of "
                              f"hidden_size * expand_ratio = {d}, but '{i_proj}' has {rows} rows "
                              f"(expand_ratio {rows / h:g} would fit)")
    g_norm = "model.layers.0.attn.g_norm.weight"
    if g_norm in names and reader.shape(g_norm) != (d // spec.num_heads,):
        found = reader.shape(g_norm)
        fits = f" (num_heads {d // found[0]} would fit)" if len(found) == 1 and found[0] and d % found[0] == 0 else ""
        raise ConfigError(f"{config_path}: num_heads {spec.num_heads} gives a g_norm of width {d // spec.num_heads}, "
                          f"but '{g_norm}' has shape {list(found)}{fits}")
    layer_ids = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if layer_ids and max(layer_ids) >= spec.num_layers:
        raise ConfigError(f"{config_path}: num_hidden_layers is {spec.num_layers}, but the checkpoint has "
                          f"layers up to {max(layer_ids)}")
    conv = sorted(n for n in names if "conv1d" in n)
    if conv:
        raise ConfigError(f"{config_path}: use_short_conv is false, but the checkpoint has short-convolution "
                          f"tensors (e.g. '{conv[0]}')")


def _check_dtype(dtype: torch.dtype | str) -> None:
    if dtype not in (torch.float32, "float32", "fp32"):
        raise UnsupportedError(f"hgrn_bit computes in float32 (its weights are 2-bit ternary codes); "
                               f"dtype {str(dtype).removeprefix('torch.')} is not supported")


def _build(spec: ModelSpec, source: _WeightSource, device: torch.device) -> HGRNBitForCausalLM:
    h, d, i, eps = spec.hidden_size, recurrence_width(spec), spec.intermediate_size, spec.norm_eps
    # All packed codes live in one buffer, allocated before anything else: one large allocation
    # stays out of the C heap, so the many short-lived chunks of quantization cannot fragment
    # memory around long-lived matrices (measured: +0.4 GB of resident set for a 1.3B model).
    # On Linux CPUs the buffer is backed by huge pages (codes_buffer).
    matrices = [s for s in checkpoint_layout(spec) if s.ternary]
    codes = codes_buffer(sum(packed_bytes(*s.shape) for s in matrices), device)
    offsets = {}
    at = 0
    for s in matrices:
        offsets[s.name] = at
        at += packed_bytes(*s.shape)

    def gain(name: str, width: int) -> Gain:
        return Gain(source.tensor(name, (width,)).to(device=device, dtype=torch.float32))

    def bitlinear(prefix: str, rows: int, cols: int) -> BitLinear:
        start = offsets[f"{prefix}.weight"]
        out = codes[start:start + packed_bytes(rows, cols)].view(rows, padded_cols(cols) // 4)
        weight = source.matrix(f"{prefix}.weight", cols, out)
        return BitLinear(weight, gain(f"{prefix}.norm.weight", cols).weight, eps)

    embeddings = source.tensor("model.embeddings.weight", (spec.vocab_size, h))
    if embeddings.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        embeddings = embeddings.float()
    embeddings = embeddings.to(device)
    lower_bounds = None
    if spec.use_lower_bound:
        raw = source.tensor("model.lower_bounds", (spec.num_layers, h)).to(device=device, dtype=torch.float32)
        lb = raw.softmax(dim=0)
        lower_bounds = lb.cumsum(dim=0) - lb[0]
    layers = []
    for n in range(spec.num_layers):
        p = f"model.layers.{n}"
        attn = MLGRU(bitlinear(f"{p}.attn.i_proj", d, h), bitlinear(f"{p}.attn.f_proj", d, h),
                     bitlinear(f"{p}.attn.g_proj", d, h), gain(f"{p}.attn.g_norm.weight", d // spec.num_heads),
                     bitlinear(f"{p}.attn.o_proj", h, d), spec.num_heads, eps)
        mlp = GLU(bitlinear(f"{p}.mlp.gate_proj", 2 * i, h), bitlinear(f"{p}.mlp.down_proj", h, i))
        layers.append(HGRNBitBlock(gain(f"{p}.attn_norm.weight", h), attn, gain(f"{p}.mlp_norm.weight", h), mlp, eps))
    norm = gain("model.norm.weight", h)
    lm_head = bitlinear("lm_head", spec.vocab_size, h)
    return HGRNBitForCausalLM(spec, embeddings, lower_bounds, layers, norm, lm_head).eval()


def load(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype | str = torch.float32,
         device: torch.device | str = "cpu") -> HGRNBitForCausalLM:
    """The model from a latent (released) or packed (memwise convert) checkpoint, one tensor at a time."""
    _check_dtype(dtype)
    where = str(reader.directory)
    packed = is_packed(reader)
    check_layout(spec, reader, where, packed)
    source = _PackedCheckpoint(reader) if packed else _LatentCheckpoint(spec, reader)
    with torch.no_grad():
        return _build(spec, source, torch.device(device))


def synthetic(spec: ModelSpec, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
              seed: int = 0) -> HGRNBitForCausalLM:
    """Random ternary codes generated packed (no latent matrices), scales ~0.02, bf16 embedding."""
    _check_dtype(dtype)
    with torch.no_grad():
        return _build(spec, _RandomWeights(seed), torch.device(device))
