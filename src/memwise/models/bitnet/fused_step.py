"""Fused decode step of BitNet b1.58 models: one C call per generated token for all layers.

Decoding one token through the PyTorch modules costs, per layer, four C products (each with its
Python checks and its own OpenMP region), torch's SDPA and about fifteen small torch operations
(rope, cache writes, splits, residuals, the GLU); on a small CPU that overhead is a third of the
step. ``FusedDecoder.step`` instead runs every layer in one OpenMP parallel region of the extension
``memwise.models.bitnet._step`` (csrc/bitnet_step.h): the BitLinears (RMSNorm, int8 per token, the
kernel library's ternary products), rotary embedding, the cache writes, attention of the one query
and the GLU. The embedding lookup, the final norm and the lm_head stay with the model.

Only a batch of one sequence with no padding in its cache takes this path (the model decides);
its keys and values go straight into the DecoderCache's float32 tensors, whose `length` and
`mask` the model keeps up to date as for any step.

What crosses into C is typed: ``ModelView`` (with ``LayerView`` and ``ProjectionView``) mirrors
the C structs of csrc/bitnet_model.h field for field (step_structs.py, shared with the torch-free
runtime memwise.lite), checked against the sizes and offsets the extension reports before a decoder is built.

Exactness. The products are exact integer arithmetic, the kernel library's. The float work between
them (norms, quantization, rotary, softmax, GLU) is the model's math in the C code's own order, so
the hidden states agree with the PyTorch path to rounding; tests check the logits within a
tolerance relative to their spread, and greedy tokens equal.
"""
from __future__ import annotations

from typing import Any

import torch

from memwise import kernels
from memwise.kernels import MAX_COLS, KernelInputError
from memwise.kernels.packed import padded_cols
from memwise.kernels.threads import CpuBudget
from memwise.models.decoder.cached_step import CachedFusedStep, float_pointer

from memwise.models.bitnet import step_structs
from memwise.models.bitnet.step_structs import (MIRRORS, LayerView, ModelView, ProjectionView, checked_layout,
                                                layout_mismatches, projection_view)

_step = step_structs._step

__all__ = ["available", "layout_mismatches", "FusedDecoder", "ProjectionView", "LayerView", "ModelView", "MIRRORS"]


def available() -> bool:
    """Whether the fused step can run here (both C extensions built)."""
    return _step is not None and kernels.HAVE_C


# --------------------------------------------------------------------------------------------
# Pointers into the model and the cache, checked


def _projection(module: Any, rows: tuple[int, ...], cols: int, what: str) -> ProjectionView:
    packed = module.packed
    want = (sum(rows), padded_cols(cols) // 4)
    if (packed.dtype != torch.uint8 or tuple(packed.shape) != want or not packed.is_contiguous()
            or packed.device.type != "cpu" or tuple(module.rows) != rows or module.cols != cols):
        raise KernelInputError(f"fused step: {what} must be packed codes uint8 {list(want)} of matrices with "
                               f"rows {list(rows)} and {cols} columns, got {packed.dtype} {list(packed.shape)}")
    if cols >= MAX_COLS:
        raise KernelInputError(f"fused step: K={cols} of {what} is too large for the C kernels")
    return projection_view(packed.data_ptr(), float_pointer(module.norm_weight, (cols,), f"{what} norm"), rows,
                           tuple(module.scales))


def _layer_view(layer: Any, n: int, spec: Any) -> LayerView:
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    attn, mlp, where = layer.attn, layer.mlp, f"layer {n}"
    return LayerView(qkv=_projection(attn.qkv, (q, kv, kv), h, f"{where} q/k/v"),
                     o=_projection(attn.out, (h,), q, f"{where} o_proj"),
                     gate_up=_projection(mlp.gate_up, (i, i), h, f"{where} gate/up"),
                     down=_projection(mlp.down, (h,), i, f"{where} down_proj"))


# --------------------------------------------------------------------------------------------
# The decoder


class FusedDecoder(CachedFusedStep):
    """The fused decode step of one BitNetForCausalLM (modules.py), on CPU, for batch 1.

    Its views hold raw pointers to the model's buffers: build a new decoder when those are
    replaced (the model drops its decoder in `_apply`). The cache's tensors are pointed to per
    cache (kept while the same cache comes back). One step at a time per decoder (a lock).
    """

    def __init__(self, model: Any, budget: CpuBudget | None = None):
        if not available():
            raise KernelInputError("the C extensions with the fused step are not built")
        checked_layout()
        spec = model.spec
        if spec.rotary_dim != spec.head_dim or spec.head_dim % 2 or spec.num_heads % spec.num_kv_heads:
            raise KernelInputError(f"fused step: rotary over {spec.rotary_dim} of {spec.head_dim} dimensions, "
                                   f"{spec.num_heads} heads over {spec.num_kv_heads} key/value heads")
        self.spec = spec
        layers = list(model.layers)
        self._layers = (LayerView * len(layers))(*[_layer_view(layer, n, spec) for n, layer in enumerate(layers)])
        self._inv_freq = model.inv_freq.to(torch.float32).contiguous()
        float_pointer(self._inv_freq, (spec.head_dim // 2,), "inv_freq")
        # Far prefetches speed up weights streaming from DRAM and slow down ones the last-level
        # cache keeps between steps (PF_FAR_BYTES in the kernel library).
        self.streams_from_dram = model.decode_bytes_per_token() > kernels.last_level_cache_bytes()
        self.view = ModelView(num_layers=len(layers), hidden=spec.hidden_size, intermediate=spec.intermediate_size,
                              heads=spec.num_heads, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                              max_length=0, eps=spec.norm_eps, relu2=int(spec.activation == "relu2"),
                              weights_from_dram=int(self.streams_from_dram), inv_freq=self._inv_freq.data_ptr(),
                              layers=self._layers)
        # The tensors the views point into stay alive as long as the decoder.
        self._model_buffers = list(model.buffers())
        self._extension = _step
        self._init_step(budget)

    def _workspace(self, isa: str, threads: int, max_length: int) -> Any:
        s = self.spec
        return self._workspaces.get((isa, threads, max_length), lambda: _step.workspace(
            kernels.isa_id(isa), s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
            s.intermediate_size, s.head_dim, max_length, threads))
