"""Fused decode step of quantized conventional decoders (gpt2, opt with int8 or int4 layers): one C
call per generated token for all layers.

Decoding one token through the PyTorch modules costs, per layer, four C products (each with its
Python checks and its own OpenMP region), torch's LayerNorm twice, SDPA, the activation, the
residual adds and the cache writes, each a Python call and a torch dispatch: on a 2-core CPU that
is nearly half of a gpt2-medium int4 step. ``FusedDecoder.step`` instead runs every layer in one
OpenMP parallel region of the extension ``memwise.models.decoder._step`` (csrc/decoder_step.h):
LayerNorm, the per-token int8 quantization and the kernel library's int8 or int4 row products
(with their biases), the cache writes, attention of the one query, the activation (gpt2's tanh
GELU or opt's ReLU) and the residuals. The embedding and positions, the final norm and the lm_head
stay with the model.

Only a batch of one sequence with no padding in a float32 DecoderCache takes this path, for a
pre-norm, sequential (not parallel), ungated, learned-position decoder whose layer projections are
all Int8Linear or all Int4Linear and whose norms are float32 LayerNorms (``supports`` says which
models; the model decides per step). Everything else keeps the PyTorch path.

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
import threading
import weakref
from typing import Any

import torch
from torch import nn

from memwise import kernels
from memwise.kernels import KernelInputError
from memwise.kernels.structs import struct_mismatches
from memwise.kernels.threads import CpuBudget
from memwise.models.decoder.quantized import Int4Linear, Int8Linear

try:
    from memwise.models.decoder import _step
except ImportError:  # built without a C compiler: decode steps run the PyTorch modules
    _step = None

__all__ = ["available", "supports", "layout_mismatches", "FusedDecoder", "ProjectionView", "LayerView", "ModelView"]

SCHEMES = {Int8Linear: 0, Int4Linear: 1}
ACTIVATIONS = {"gelu_new": 0, "relu": 1}


# --------------------------------------------------------------------------------------------
# Mirrors of csrc/decoder_model.h


class ProjectionView(ctypes.Structure):
    """decoder_projection_t: one quantized linear's weights, row sums (int8), scales or group
    constants, bias, and sizes."""
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
    """decoder_model_t: sizes, the scheme and activation, and the layers."""
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("max_length", ctypes.c_int64), ("eps", ctypes.c_float), ("scheme", ctypes.c_int32),
                ("activation", ctypes.c_int32), ("layers", ctypes.POINTER(LayerView))]


MIRRORS = {"decoder_projection_t": ProjectionView, "decoder_layer_t": LayerView, "decoder_model_t": ModelView}


def layout_mismatches() -> list[str]:
    """How the ctypes mirrors differ from the C structs of the built extension (empty: they agree)."""
    return struct_mismatches(_step.struct_layout(), MIRRORS)


@functools.cache
def _checked_layout() -> None:
    mismatches = layout_mismatches()
    if mismatches:
        raise RuntimeError("memwise.models.decoder._step was built from other structs than fused_step.py "
                           f"mirrors (rebuild with python setup.py build_ext): {'; '.join(mismatches)}")


def available() -> bool:
    """Whether the fused step can run here (both C extensions built)."""
    return _step is not None and kernels.HAVE_C


def _scheme(model: Any) -> int | None:
    """The scheme id when every layer projection is of one kind (Int8Linear or Int4Linear), else None."""
    kinds = {type(m) for layer in model.layers for m in (layer.attn.qkv, layer.attn.out, layer.mlp.up, layer.mlp.down)}
    return SCHEMES.get(kinds.pop()) if len(kinds) == 1 else None


def supports(model: Any) -> bool:
    """Whether `model` (a Decoder) has the shape the fused step computes: pre-norm sequential layers
    with float32 LayerNorms, learned positions, an ungated gelu_new or relu MLP, no sliding window,
    and all layer projections int8 or all int4, on the CPU."""
    spec = model.spec
    if (spec.norm != "layernorm" or not spec.pre_norm or spec.parallel_block or spec.gated_mlp
            or spec.positions != "learned" or spec.activation not in ACTIVATIONS or spec.sliding_window is not None
            or spec.num_heads % spec.num_kv_heads or not len(model.layers) or _scheme(model) is None):
        return False
    norms = [n for layer in model.layers for n in (layer.attn_norm, layer.mlp_norm)]
    return all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None
               and n.weight.dtype == torch.float32 and n.weight.device.type == "cpu" for n in norms)


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
        scales = _floats(linear.params, (rows, kp // 64, 2), f"{what} group constants")
    return ProjectionView(weights=weights, row_sums=sums, scales=scales, bias=bias, rows=rows, cols=cols,
                          padded_cols=kp)


def _layer_view(layer: Any, n: int, spec: Any) -> LayerView:
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    where = f"layer {n}"
    norms = [_floats(t.data, (h,), f"{where} {name}") for t, name in
             ((layer.attn_norm.weight, "attention norm"), (layer.attn_norm.bias, "attention norm bias"),
              (layer.mlp_norm.weight, "MLP norm"), (layer.mlp_norm.bias, "MLP norm bias"))]
    return LayerView(qkv=_projection(layer.attn.qkv, q + 2 * kv, h, f"{where} q/k/v"),
                     out=_projection(layer.attn.out, h, q, f"{where} out"),
                     up=_projection(layer.mlp.up, i, h, f"{where} up"),
                     down=_projection(layer.mlp.down, h, i, f"{where} down"),
                     attn_norm_weight=norms[0], attn_norm_bias=norms[1], mlp_norm_weight=norms[2],
                     mlp_norm_bias=norms[3])


# --------------------------------------------------------------------------------------------
# The decoder


class FusedDecoder:
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
        self.view = ModelView(num_layers=len(layers), hidden=spec.hidden_size, intermediate=spec.intermediate_size,
                              heads=spec.num_heads, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                              max_length=0, eps=spec.norm_eps, scheme=self.scheme,
                              activation=ACTIVATIONS[spec.activation], layers=self._layers)
        # The tensors the views point into stay alive as long as the decoder.
        self._model_tensors = [*model.layers.parameters(), *model.layers.buffers()]
        self._cache: Any = None     # a weak reference to the cache the layer views point into
        self._workspaces: dict[tuple[str, int, int], Any] = {}
        self._lock = threading.Lock()
        self._budget = budget or CpuBudget()

    def _point_at(self, cache: Any) -> None:
        """The layer views' key/value pointers at `cache`'s tensors (checked)."""
        spec = self.spec
        shape = (1, spec.num_kv_heads, cache.max_length, spec.head_dim)
        for n in range(len(self._layers)):
            self._layers[n].keys = _floats(cache.keys[n], shape, f"cache keys of layer {n}")
            self._layers[n].values = _floats(cache.values[n], shape, f"cache values of layer {n}")
        self.view.max_length = cache.max_length
        self._cache = weakref.ref(cache)

    def _workspace(self, isa: str, threads: int, max_length: int) -> Any:
        key = (isa, threads, max_length)
        ws = self._workspaces.get(key)
        if ws is None:
            if len(self._workspaces) >= 4:  # cache lengths come and go; keep the recent few
                self._workspaces.pop(next(iter(self._workspaces)))
            s = self.spec
            ws = _step.workspace(kernels.isa_id(isa), self.scheme, s.hidden_size, s.num_heads * s.head_dim,
                                 s.num_kv_heads * s.head_dim, s.intermediate_size, s.head_dim, max_length, threads)
            self._workspaces[key] = ws
        return ws

    def step(self, x: torch.Tensor, cache: Any, isa: str | None = None) -> torch.Tensor:
        """The hidden state [1, 1, H] after the last layer for the embedded token x [1, 1, H] (float32),
        whose key and value go into `cache` at slot cache.length (the caller records the token in
        the cache and advances its length)."""
        h = self.spec.hidden_size
        if cache.batch_size != 1 or cache.padded or cache.length >= cache.max_length:
            raise KernelInputError(f"fused step: needs a cache of one unpadded sequence with a free slot, got "
                                   f"{cache.batch_size} sequences, {cache.length} of {cache.max_length} slots")
        x = x.to(torch.float32).contiguous().clone()
        _floats(x, (1, 1, h), "x")
        name = kernels.resolve_isa(isa)
        threads = self._budget.threads(kernels.num_threads())
        with self._lock:
            if self._cache is None or self._cache() is not cache:
                self._point_at(cache)
            ws = self._workspace(name, threads, cache.max_length)
            _step.step(ws, ctypes.addressof(self.view), x.data_ptr(), cache.length)
        return x
