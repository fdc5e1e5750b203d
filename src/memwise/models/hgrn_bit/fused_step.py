"""Fused decode step of HGRN-Bit models: one C call per generated token for all layers and the lm_head.

Decoding one token through the per-BitLinear path costs, per layer, six kernel calls (each with
its Python checks and its own OpenMP region) and about twenty small torch operations; on a small
CPU that overhead is as large as streaming the ternary weights. ``FusedDecoder.step`` instead runs
the whole step in one OpenMP parallel region of the extension ``memwise.models.hgrn_bit._step``
(csrc/hgrn_step.h): RMSNorms, activation quantization, the ternary products of the kernel library,
the MLGRU gates and recurrence, the GLU, the final norm and the lm_head.

What crosses into C is typed: ``ModelView`` (with ``LayerView`` and ``BitLinearView``, in
step_structs.py) mirrors the C structs of csrc/hgrn_model.h field for field; ``layout_mismatches()``
compares the mirrors with the sizes and offsets the extension reports, and a decoder is only built
when they agree.

Exactness. The products are exact integer arithmetic, the kernel library's. The float work between
them (norms, quantization, exp, gates) is the model's math in the C code's own order, so the logits
agree with the PyTorch path of the model (``modules.py``) to rounding; tests check them within a
tolerance relative to the logits' spread, and greedy tokens equal.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch

from memwise import kernels
from memwise.kernels import MAX_COLS, KernelInputError
from memwise.kernels.packed_layout import padded_cols
from memwise.kernels.threads import CpuBudget
from memwise.kernels.workspaces import RecentWorkspaces
from memwise.models.hgrn_bit.step_structs import (MIRRORS, BitLinearView, LayerView, ModelView, _step,
                                                  checked_layout, layout_mismatches)

__all__ = ["available", "layout_mismatches", "FusedDecoder", "BitLinearView", "LayerView", "ModelView"]


def available() -> bool:
    """Whether the fused step can run here (both C extensions built)."""
    return _step is not None and kernels.HAVE_C


# --------------------------------------------------------------------------------------------
# Pointers into the model, checked


def _gain(t: torch.Tensor, width: int, what: str) -> int:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != width:
        raise KernelInputError(f"fused step: {what} must be a contiguous float32 CPU tensor of {width} "
                               f"values, got {t.dtype} {list(t.shape)} on {t.device}")
    return t.data_ptr()


def _bitlinear(module: Any, rows: int, cols: int, what: str) -> BitLinearView:
    packed = module.packed
    want = (rows, padded_cols(cols) // 4)
    if (packed.dtype != torch.uint8 or tuple(packed.shape) != want or not packed.is_contiguous()
            or packed.device.type != "cpu" or module.rows != rows or module.cols != cols):
        raise KernelInputError(f"fused step: {what} must be packed codes uint8 {list(want)} for a "
                               f"{rows}x{cols} matrix, got {packed.dtype} {list(packed.shape)}")
    if cols >= MAX_COLS:
        raise KernelInputError(f"fused step: K={cols} of {what} is too large for the C kernels")
    return BitLinearView(packed.data_ptr(), _gain(module.norm_weight, cols, f"{what}.norm"), module.scale)


def _layer_view(layer: Any, n: int, sizes: tuple[int, int, int, int], lower: torch.Tensor | None) -> LayerView:
    h, d, i, heads = sizes
    attn, mlp, where = layer.attn, layer.mlp, f"layer {n}"
    return LayerView(
        attn_norm=_gain(layer.attn_norm.weight, h, f"{where} attn_norm"),
        i_proj=_bitlinear(attn.i_proj, d, h, f"{where} i_proj"),
        f_proj=_bitlinear(attn.f_proj, d, h, f"{where} f_proj"),
        g_proj=_bitlinear(attn.g_proj, d, h, f"{where} g_proj"),
        g_norm=_gain(attn.g_norm.weight, d // heads, f"{where} g_norm"),
        o_proj=_bitlinear(attn.o_proj, h, d, f"{where} o_proj"),
        mlp_norm=_gain(layer.mlp_norm.weight, h, f"{where} mlp_norm"),
        gate_proj=_bitlinear(mlp.gate_proj, 2 * i, h, f"{where} gate_proj"),
        down_proj=_bitlinear(mlp.down_proj, h, i, f"{where} down_proj"),
        lower_bound=lower[n].data_ptr() if lower is not None and n > 0 else None)


# --------------------------------------------------------------------------------------------
# The decoder


class FusedDecoder:
    """The fused decode step of one HGRNBitForCausalLM (modules.py), on CPU.

    Its ModelView holds raw pointers to the model's buffers: build a new decoder when those are
    replaced (the model drops its cached decoder in `_apply`, i.e. on .to() and friends). One step
    at a time per decoder (a lock serializes callers; its workspace is shared).
    """

    def __init__(self, model: Any, budget: CpuBudget | None = None):
        if not available():
            raise KernelInputError("the C extensions with the fused step are not built")
        checked_layout()
        spec = model.spec
        h, d, i, v, heads = (spec.hidden_size, spec.hidden_size * spec.expand_ratio, spec.intermediate_size,
                             spec.vocab_size, spec.num_heads)
        if d % heads:
            raise KernelInputError(f"fused step: {heads} heads do not divide the recurrence width {d}")
        layers = list(model.layers)
        lower = model.lower_bounds
        if lower is not None and (lower.dtype != torch.float32 or not lower.is_contiguous()
                                  or tuple(lower.shape) != (len(layers), d)):
            raise KernelInputError(f"fused step: lower bounds must be contiguous float32 [{len(layers)}, {d}]")
        self.sizes = (h, d, i, v)
        self.num_layers = len(layers)
        self._layers = (LayerView * len(layers))(*[_layer_view(layer, n, (h, d, i, heads), lower)
                                                   for n, layer in enumerate(layers)])
        # Far prefetches speed up weights streaming from DRAM and slow down ones the last-level
        # cache keeps between steps (PF_FAR_BYTES in the kernel library).
        self.streams_from_dram = model.decode_bytes_per_token() > kernels.last_level_cache_bytes()
        self.view = ModelView(num_layers=len(layers), hidden=h, width=d, intermediate=i, vocab=v, heads=heads,
                              eps=spec.norm_eps, weights_from_dram=int(self.streams_from_dram),
                              final_norm=_gain(model.norm.weight, h, "model.norm"),
                              lm_head=_bitlinear(model.lm_head, v, h, "lm_head"), layers=self._layers)
        # The tensors the view points into stay alive as long as the decoder.
        self._model_buffers = list(model.buffers())
        self.embeddings = model.embeddings
        self._workspaces = RecentWorkspaces()
        self._lock = threading.Lock()
        self._budget = budget or CpuBudget()

    def _workspace(self, batch: int, isa: str, threads: int) -> Any:
        h, d, i, _ = self.sizes
        return self._workspaces.get((batch, isa, threads),
                                    lambda: _step.workspace(kernels.isa_id(isa), batch, h, d, i, threads))

    def _check_state(self, state: torch.Tensor, batch: int) -> None:
        d = self.sizes[1]
        if (state.dtype != torch.float32 or state.device.type != "cpu" or not state.is_contiguous()
                or tuple(state.shape) != (self.num_layers, batch, d)):
            raise KernelInputError(f"fused step: state must be contiguous float32 CPU "
                                   f"[{self.num_layers}, {batch}, {d}], got {state.dtype} {list(state.shape)}")

    def step(self, input_ids: torch.Tensor, state: torch.Tensor, mask: torch.Tensor | None = None,
             isa: str | None = None) -> torch.Tensor:
        """Logits float32 [B, 1, V] of one token per sequence (input_ids [B, 1]); advances `state`
        [L, B, D] (float32, contiguous) in place. `mask` [B] (1: real token, 0: padding) zeroes the
        recurrence input of padded positions, as the model does with its attention mask."""
        v = self.sizes[3]
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise KernelInputError(f"fused step: input_ids must be [B, 1], got {list(input_ids.shape)}")
        batch = input_ids.shape[0]
        self._check_state(state, batch)
        mask_ptr = 0
        if mask is not None:
            mask = mask.reshape(-1).to(torch.float32).contiguous()
            if mask.numel() != batch:
                raise KernelInputError(f"fused step: mask must have {batch} values, got {mask.numel()}")
            mask_ptr = mask.data_ptr()
        name = kernels.resolve_isa(isa)
        threads = self._budget.threads(kernels.num_threads())
        x = self.embeddings.index_select(0, input_ids.reshape(-1)).to(torch.float32).contiguous()
        logits = torch.empty((batch, v), dtype=torch.float32)
        if batch == 0:
            return logits.view(0, 1, v)
        with self._lock:
            ws = self._workspace(batch, name, threads)
            _step.step(ws, ctypes.addressof(self.view), x.data_ptr(), state.data_ptr(), mask_ptr, logits.data_ptr())
        return logits.view(batch, 1, v)
