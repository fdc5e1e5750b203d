"""Fused decode step of quantized conventional decoders (gpt2, opt, llama, mistral with int8 or int4
layers): one C call per generated token for all layers.

Decoding one token through the PyTorch modules costs, per layer, four C products (each with its
Python checks and its own OpenMP region), torch's LayerNorm twice, SDPA, the activation, the
residual adds and the cache writes, each a Python call and a torch dispatch: on a 2-core CPU that
is nearly half of a gpt2-medium int4 step. ``FusedDecoder.step`` instead runs every layer in one
OpenMP parallel region of the extension ``memwise.models.decoder._step`` (csrc/decoder_step.h):
the norms (LayerNorm or RMSNorm), the per-token int8 quantization and the kernel library's int8 or
int4 row products (with their biases), rotary embedding, the cache writes, attention of the one
query (grouped query attention too), the activation (gpt2's tanh GELU, opt's ReLU, or the SiLU GLU
of llama and mistral) and the residuals. The embedding and learned positions, the final norm and
the lm_head stay with the model.

Only a batch of one sequence with no padding in a float32 DecoderCache takes this path, for a
pre-norm, sequential (not parallel) decoder whose layer projections are all Int8Linear or all
Int4Linear and whose norms are float32 (``supports`` says which models; the model decides per
step, and a sliding window is left to the PyTorch path once the sequence reaches it). Everything
else keeps the PyTorch path.

What crosses into C is typed: ``ModelView`` (with ``LayerView`` and ``ProjectionView``) mirrors the
C structs of csrc/decoder_model.h field for field, and ``layout_mismatches()`` compares them with
the sizes and offsets the extension reports before a decoder is built.

Exactness. The products are the kernel library's exact integer arithmetic and the same float
combine as Int8Linear / Int4Linear. The float work between them is the model's math in the C
code's own order, so hidden states agree with the PyTorch path to rounding (an activation within an
ulp of a rounding boundary can quantize one step away); tests check the logits within a tolerance
relative to their spread, and greedy tokens equal.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from memwise import kernels
from memwise.kernels import KernelInputError
from memwise.kernels.structs import require_agreement, struct_mismatches
from memwise.kernels.threads import CpuBudget
from memwise.models.decoder.cached_step import CachedFusedStep
from memwise.models.decoder.quantized import Int4Linear, Int8Linear

try:
    from memwise.models.decoder import _step
except ImportError:  # built without a C compiler: decode steps run the PyTorch modules
    _step = None

__all__ = ["available", "supports", "layout_mismatches", "FusedDecoder", "ProjectionView", "LayerView", "ModelView"]

SCHEMES = {Int8Linear: 0, Int4Linear: 1}
ACTIVATIONS = {"gelu_new": 0, "relu": 1, "silu": 2}
NORMS = {"layernorm": 0, "rmsnorm": 1}


# --------------------------------------------------------------------------------------------
# Mirrors of csrc/decoder_model.h


class ProjectionView(ctypes.Structure):
    """decoder_projection_t: one quantized linear's weights, row sums (int8), scales (int8) or
    float16 group constants (int4), bias, and sizes."""
    _fields_ = [("weights", ctypes.c_void_p), ("row_sums", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("padded_cols", ctypes.c_int64)]


class LayerView(ctypes.Structure):
    """decoder_layer_t: one layer's projections, norms and cache tensors."""
    _fields_ = [("qkv", ProjectionView), ("out", ProjectionView), ("up", ProjectionView), ("down", ProjectionView),
                ("attn_norm_weight", ctypes.c_void_p), ("attn_norm_bias", ctypes.c_void_p),
                ("mlp_norm_weight", ctypes.c_void_p), ("mlp_norm_bias", ctypes.c_void_p),
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


class ModelView(ctypes.Structure):
    """decoder_model_t: sizes, the scheme, activation, norm and positions, and the layers."""
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("max_length", ctypes.c_int64), ("eps", ctypes.c_float), ("scheme", ctypes.c_int32),
                ("activation", ctypes.c_int32), ("norm", ctypes.c_int32), ("gated", ctypes.c_int32),
                ("rotary_dim", ctypes.c_int64), ("inv_freq", ctypes.c_void_p), ("layers", ctypes.POINTER(LayerView))]


MIRRORS = {"decoder_projection_t": ProjectionView, "decoder_layer_t": LayerView, "decoder_model_t": ModelView}


def layout_mismatches() -> list[str]:
    """How the ctypes mirrors differ from the C structs of the built extension (empty: they agree)."""
    return struct_mismatches(_step.struct_layout(), MIRRORS)


@functools.cache
def _checked_layout() -> None:
    require_agreement("memwise.models.decoder._step", layout_mismatches())


def available() -> bool:
    """Whether the fused step can run here (both C extensions built)."""
    return _step is not None and kernels.HAVE_C


def _scheme(model: Any) -> int | None:
    """The scheme id when every layer projection is of one kind (Int8Linear or Int4Linear), else None."""
    kinds = {type(m) for layer in model.layers for m in (layer.attn.qkv, layer.attn.out, layer.mlp.up, layer.mlp.down)}
    return SCHEMES.get(kinds.pop()) if len(kinds) == 1 else None


def supports(model: Any) -> bool:
    """Whether `model` (a Decoder) has the shape the fused step computes: pre-norm sequential layers
    with float32 LayerNorms (with biases) or RMSNorms; learned positions, or rotary ones whose
    frequencies do not change with the length (not "dynamic"); an ungated gelu_new or relu MLP or a
    gated silu one; all layer projections int8 or all int4; on the CPU."""
    spec = model.spec
    rotary = spec.positions == "rotary"
    if (spec.norm not in NORMS or not spec.pre_norm or spec.parallel_block or spec.activation not in ACTIVATIONS
            or spec.gated_mlp != (spec.activation == "silu") or spec.num_heads % spec.num_kv_heads
            or (rotary and ((spec.rope_scaling or {}).get("rope_type") == "dynamic" or spec.rotary_dim % 2))
            or not len(model.layers) or _scheme(model) is None):
        return False
    norms = [n for layer in model.layers for n in (layer.attn_norm, layer.mlp_norm)]
    biased = spec.norm == "layernorm"
    return all(n.weight is not None and n.weight.dtype == torch.float32 and n.weight.device.type == "cpu"
               and (getattr(n, "bias", None) is not None) == biased for n in norms)


# --------------------------------------------------------------------------------------------
# Pointers into the model and the cache, checked


def _tensor(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> int:
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
        raise KernelInputError(f"fused step: {what} must be a contiguous {dtype} CPU tensor {list(shape)}, "
                               f"got {t.dtype} {list(t.shape)} on {t.device}")
    return t.data_ptr()


def _floats(t: torch.Tensor, shape: tuple[int, ...], what: str) -> int:
    return _tensor(t, torch.float32, shape, what)


def _projection(linear: Any, rows: int, cols: int, what: str) -> ProjectionView:
    if (linear.out_features, linear.in_features) != (rows, cols):
        raise KernelInputError(f"fused step: {what} must be [{rows}, {cols}], "
                               f"got [{linear.out_features}, {linear.in_features}]")
    bias = 0 if linear.bias is None else _floats(linear.bias.data, (rows,), f"{what} bias")
    if isinstance(linear, Int8Linear):
        kp = linear.weight.shape[1]
        weights = _tensor(linear.weight, torch.int8, (rows, kp), f"{what} weights")
        sums = _tensor(linear.row_sums, torch.int32, (rows,), f"{what} row sums")
        scales = _floats(linear.scale, (rows,), f"{what} scales")
    else:
        kp = linear.codes.shape[1] * 2
        weights, sums = _tensor(linear.codes, torch.uint8, (rows, kp // 2), f"{what} codes"), 0
        scales = _tensor(linear.params, torch.float16, (rows, kp // 64, 2), f"{what} group constants")
    return ProjectionView(weights=weights, row_sums=sums, scales=scales, bias=bias, rows=rows, cols=cols,
                          padded_cols=kp)


def _layer_view(layer: Any, n: int, spec: Any) -> LayerView:
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    where = f"layer {n}"
    norms = [0 if t is None else _floats(t.data, (h,), f"{where} {name}") for t, name in
             ((layer.attn_norm.weight, "attention norm"), (getattr(layer.attn_norm, "bias", None), "attention norm bias"),
              (layer.mlp_norm.weight, "MLP norm"), (getattr(layer.mlp_norm, "bias", None), "MLP norm bias"))]
    up_rows = 2 * i if spec.gated_mlp else i
    return LayerView(qkv=_projection(layer.attn.qkv, q + 2 * kv, h, f"{where} q/k/v"),
                     out=_projection(layer.attn.out, h, q, f"{where} out"),
                     up=_projection(layer.mlp.up, up_rows, h, f"{where} up"),
                     down=_projection(layer.mlp.down, h, i, f"{where} down"),
                     attn_norm_weight=norms[0], attn_norm_bias=norms[1], mlp_norm_weight=norms[2],
                     mlp_norm_bias=norms[3])


# --------------------------------------------------------------------------------------------
# The decoder


class FusedDecoder(CachedFusedStep):
    """The fused decode step of one quantized Decoder (modules.py) on CPU, for batch 1.

    Its views hold raw pointers to the model's tensors: build a new decoder when those are replaced
    (the model drops its decoder in `_apply`). The cache's tensors are pointed to per cache (kept
    while the same cache comes back). One step at a time per decoder (a lock).
    """

    def __init__(self, model: Any, budget: CpuBudget | None = None):
        if not available():
            raise KernelInputError("the C extensions with the fused decoder step are not built")
        if not supports(model):
            raise KernelInputError(f"fused step: a {model.spec.model_type} model of this shape or precision has no "
                                   "fused step (see memwise.models.decoder.fused_step.supports)")
        _checked_layout()
        spec = self.spec = model.spec
        layers = list(model.layers)
        self.scheme = _scheme(model)
        self._layers = (LayerView * len(layers))(*[_layer_view(layer, n, spec) for n, layer in enumerate(layers)])
        rotary_dim, inv_freq = 0, 0
        if spec.positions == "rotary":
            rotary_dim = spec.rotary_dim
            if model.inv_freq is None:      # set at load (init_rotary) or by the first forward
                model.init_rotary()
            self._inv_freq = model.inv_freq.to(torch.float32).contiguous()
            inv_freq = _floats(self._inv_freq, (rotary_dim // 2,), "inv_freq")
        self.view = ModelView(num_layers=len(layers), hidden=spec.hidden_size, intermediate=spec.intermediate_size,
                              heads=spec.num_heads, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                              max_length=0, eps=spec.norm_eps, scheme=self.scheme,
                              activation=ACTIVATIONS[spec.activation], norm=NORMS[spec.norm],
                              gated=int(spec.gated_mlp), rotary_dim=rotary_dim, inv_freq=inv_freq, layers=self._layers)
        # The tensors the views point into stay alive as long as the decoder.
        self._model_tensors = [*model.layers.parameters(), *model.layers.buffers()]
        self._extension = _step
        self._init_step(budget)

    def _workspace(self, isa: str, threads: int, max_length: int) -> Any:
        s = self.spec
        return self._workspaces.get((isa, threads, max_length), lambda: _step.workspace(
            kernels.isa_id(isa), self.scheme, s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
            s.intermediate_size, s.head_dim, max_length, threads))
