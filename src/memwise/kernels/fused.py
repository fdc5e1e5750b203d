"""Fused decode step of HGRN-Bit models: one C call per generated token for all layers and the lm_head.

Decoding one token through the per-BitLinear path costs, per layer, six kernel calls (each with
its Python checks and its own OpenMP region) and about twenty small torch operations; on a small
CPU that overhead is as large as streaming the ternary weights. ``FusedDecoder.step`` instead runs
the whole step in one OpenMP parallel region of the C extension: RMSNorms, activation quantization,
the ternary products (split over output rows, with the multi-row tiles of the existing kernels for
batches), the MLGRU gates and recurrence, the GLU, the final norm and the lm_head. Python builds a
plan of pointers once per model and a workspace once per batch size.

Exactness. The products, RMSNorms and quantizations are the functions behind
``memwise.kernels.bitlinear``, so they are bit-identical to the reference wherever that is. The
elementwise operations are written in the order and with the roundings of the model's PyTorch code,
and exp is computed the way torch's CPU kernels compute it: torch runs sigmoid and silu in a vector
loop (Sleef's expf algorithm) over all but the last few elements of each contiguous segment, which
go through the C library's expf. ``exp_step()`` finds, by comparing with torch at run time, which
vector loop length reproduces torch here; ``elementwise_matches_torch()`` reports whether one did.
When it did (and ``rms_order_matches_torch()``), a fused step gives the same logits and state, bit
for bit, as the unfused path. Otherwise a sigmoid or silu value can differ in its last bit; now and
then that moves an int8 activation by one step, which changes that BitLinear's output by one
quantization step of its row and propagates like any other rounding difference.

Instruction sets. The products use the path ``isa_paths()`` picks (MEMWISE_ISA forces one), and the
float work around them (quantization, exp, elementwise operations) uses the vector code of the same
level (AVX-512, AVX2 or plain C), so forcing a path also runs the code a machine with only that
path would run. Every level computes the same bits.
"""
from __future__ import annotations

import threading
from typing import Any

import torch

from memwise import kernels as _kernels
from memwise.kernels import MAX_COLS, KernelInputError, _ISA_IDS, _resolve_isa, _threads, _width
from memwise.ternary import padded_cols

__all__ = ["available", "exp_step", "elementwise_matches_torch", "activation", "FusedDecoder"]

# Layout of the plan; must match hgrn_step.h (PLAN_HEADER, PLAN_LAYER, SCALES_*, the PL_* and SC_*
# enums).
_PLAN_HEADER = 16
_PLAN_LAYER = 16
_SCALES_HEADER = 8
_SCALES_LAYER = 8
_LAYER_FIELDS = ("attn_norm", "i_w", "i_g", "f_w", "f_g", "g_w", "g_g", "g_norm", "o_w", "o_g",
                 "mlp_norm", "gate_w", "gate_g", "down_w", "down_g", "lower")
_SCALE_FIELDS = ("i", "f", "g", "o", "gate", "down")


def available() -> bool:
    """Whether the C extension has the fused step (it may be an older build without it)."""
    return _kernels.HAVE_C and hasattr(_kernels._c, "hgrn_step")


# --------------------------------------------------------------------------------------------
# How torch computes exp in sigmoid and silu

_exp_lock = threading.Lock()
_exp_found: tuple[int, bool] | None = None


def _activation(kind: int, x: torch.Tensor, rowsplit: bool, step: int, torch_threads: int) -> torch.Tensor:
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=torch.float32)
    if x.numel():
        _kernels._c.activation(kind, x.data_ptr(), out.data_ptr(), rows, cols, x.stride(0), int(rowsplit),
                               step, torch_threads)
    return out


def _find_exp_step() -> tuple[int, bool]:
    """The vector loop length (2 x torch's float vector width; 0: no vector exp) with which our
    sigmoid and silu equal torch's on inputs that reach every branch of exp: ordinary values,
    large ones, values that underflow, and lengths that leave a tail for the scalar loop."""
    gen = torch.Generator().manual_seed(4321)
    probes = [torch.randn(rows, cols, generator=gen) * scale
              for rows, cols, scale in ((1, 1000, 4.0), (3, 77, 20.0), (2, 45, 1.0), (1, 16, 60.0))]
    probes.append(torch.linspace(-110.0, 110.0, 997).view(1, -1))
    # Single-threaded sizes (below torch's grain of 32768), so the probe does not depend on threads.
    expected = [(torch.sigmoid(x), torch.nn.functional.silu(x)) for x in probes]
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
    candidates = (32, 16, 0) if "AVX512" in capability else (16, 32, 0)
    for step in candidates:
        if all(torch.equal(_activation(0, x, False, step, 1).view(torch.int32), sig.view(torch.int32))
               and torch.equal(_activation(1, x, False, step, 1).view(torch.int32), silu.view(torch.int32))
               for x, (sig, silu) in zip(probes, expected)):
            return step, True
    return candidates[0], False


def _exp() -> tuple[int, bool]:
    global _exp_found
    if _exp_found is None:
        with _exp_lock:
            if _exp_found is None:
                _exp_found = _find_exp_step() if available() else (0, False)
    return _exp_found


def exp_step() -> int:
    """Elements per iteration of torch's vector loop for sigmoid and silu here (0: none)."""
    return _exp()[0]


def elementwise_matches_torch() -> bool:
    """Whether the fused step's sigmoid and silu reproduce torch's bit for bit on this machine."""
    return _exp()[1]


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """sigmoid or silu of a 2-d float32 CPU tensor (rows may be strided), as the fused step computes
    them; exposed to compare with torch."""
    if not available():
        raise KernelInputError("the C extension with the fused step is not built")
    if kind not in ("sigmoid", "silu"):
        raise KernelInputError(f"unknown activation {kind!r} (sigmoid or silu)")
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu" or x.stride(1) != 1:
        raise KernelInputError("activation expects a float32 CPU tensor [rows, cols] with contiguous rows")
    return _activation(0 if kind == "sigmoid" else 1, x, not x.is_contiguous(), exp_step(), _threads())


# --------------------------------------------------------------------------------------------
# The plan


def _gain(t: torch.Tensor, width: int, what: str) -> int:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != width:
        raise KernelInputError(f"fused step: {what} must be a contiguous float32 CPU tensor of {width} "
                               f"values, got {t.dtype} {list(t.shape)} on {t.device}")
    return t.data_ptr()


def _codes(layer: Any, rows: int, cols: int, what: str) -> int:
    packed = layer.packed
    want = (rows, padded_cols(cols) // 4)
    if (packed.dtype != torch.uint8 or tuple(packed.shape) != want or not packed.is_contiguous()
            or packed.device.type != "cpu" or layer.rows != rows or layer.cols != cols):
        raise KernelInputError(f"fused step: {what} must be packed codes uint8 {list(want)} for a "
                               f"{rows}x{cols} matrix, got {packed.dtype} {list(packed.shape)}")
    if cols >= MAX_COLS:
        raise KernelInputError(f"fused step: K={cols} of {what} is too large for the C kernels")
    return packed.data_ptr()


class FusedDecoder:
    """The fused decode step of one HGRNBitForCausalLM (memwise.models.hgrn_bit), on CPU.

    The plan holds raw pointers to the model's buffers: build a new decoder when those are replaced
    (the model drops its cached decoder in `_apply`, i.e. on .to() and friends). One step at a time
    per decoder (a lock serializes callers; its workspace is shared).
    """

    def __init__(self, model: Any):
        if not available():
            raise KernelInputError("the C extension with the fused step is not built")
        spec = model.spec
        h = spec.hidden_size
        d = h * spec.expand_ratio
        i = spec.intermediate_size
        heads = spec.num_heads
        v = spec.vocab_size
        layers = list(model.layers)
        n_layers = len(layers)
        if d % heads:
            raise KernelInputError(f"fused step: {heads} heads do not divide the recurrence width {d}")
        self.sizes = (h, d, i, v)
        self.num_layers = n_layers
        self.eps = float(spec.norm_eps)
        plan = [0] * (_PLAN_HEADER + n_layers * _PLAN_LAYER)
        scales = [0.0] * (_SCALES_HEADER + n_layers * _SCALES_LAYER)
        plan[:9] = [n_layers, h, d, i, v, heads, _gain(model.norm.weight, h, "model.norm"),
                    _codes(model.lm_head, v, h, "lm_head"), _gain(model.lm_head.norm_weight, h, "lm_head.norm")]
        # Far prefetches speed up weights streaming from DRAM and slow down ones the last-level
        # cache keeps between steps (see PF_FAR_BYTES in products.h).
        self.streams_from_dram = model.decode_bytes_per_token() > _kernels._last_level_cache_bytes()
        plan[9] = int(self.streams_from_dram)
        scales[0] = model.lm_head.scale
        lower = model.lower_bounds
        if lower is not None and (lower.dtype != torch.float32 or not lower.is_contiguous()
                                  or tuple(lower.shape) != (n_layers, d)):
            raise KernelInputError(f"fused step: lower bounds must be contiguous float32 [{n_layers}, {d}]")
        for n, layer in enumerate(layers):
            attn, mlp = layer.attn, layer.mlp
            where = f"layer {n}"
            fields = {
                "attn_norm": _gain(layer.attn_norm.weight, h, f"{where} attn_norm"),
                "g_norm": _gain(attn.g_norm.weight, d // heads, f"{where} g_norm"),
                "mlp_norm": _gain(layer.mlp_norm.weight, h, f"{where} mlp_norm"),
                "lower": lower[n].data_ptr() if lower is not None and n > 0 else 0,
            }
            for name, module, rows, cols in (("i", attn.i_proj, d, h), ("f", attn.f_proj, d, h),
                                             ("g", attn.g_proj, d, h), ("o", attn.o_proj, h, d),
                                             ("gate", mlp.gate_proj, 2 * i, h), ("down", mlp.down_proj, h, i)):
                fields[f"{name}_w"] = _codes(module, rows, cols, f"{where} {name}_proj")
                fields[f"{name}_g"] = _gain(module.norm_weight, cols, f"{where} {name}_proj.norm")
                scales[_SCALES_HEADER + n * _SCALES_LAYER + _SCALE_FIELDS.index(name)] = module.scale
            base = _PLAN_HEADER + n * _PLAN_LAYER
            for k, name in enumerate(_LAYER_FIELDS):
                plan[base + k] = fields[name]
        self.plan = torch.tensor(plan, dtype=torch.int64)
        self.scales = torch.tensor(scales, dtype=torch.float32)
        # The tensors the plan points into stay alive as long as the decoder.
        self._model_buffers = list(model.buffers())
        self.embeddings = model.embeddings
        self._workspaces: dict[tuple[int, str, int], Any] = {}
        self._lock = threading.Lock()

    def _workspace(self, batch: int, isa: str, threads: int) -> Any:
        key = (batch, isa, threads)
        ws = self._workspaces.get(key)
        if ws is None:
            if len(self._workspaces) >= 4:  # batch sizes come and go; keep the recent few
                self._workspaces.pop(next(iter(self._workspaces)))
            h, d, i, _ = self.sizes
            ws = _kernels._c.hgrn_workspace(_ISA_IDS[isa], batch, h, d, i, threads)
            self._workspaces[key] = ws
        return ws

    def step(self, input_ids: torch.Tensor, state: torch.Tensor, mask: torch.Tensor | None = None,
             isa: str | None = None) -> torch.Tensor:
        """Logits float32 [B, 1, V] of one token per sequence (input_ids [B, 1]); advances `state`
        [L, B, D] (float32, contiguous) in place. `mask` [B] (1: real token, 0: padding) zeroes the
        recurrence input of padded positions, as the model does with its attention mask."""
        h, d, _, v = self.sizes
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise KernelInputError(f"fused step: input_ids must be [B, 1], got {list(input_ids.shape)}")
        batch = input_ids.shape[0]
        if (state.dtype != torch.float32 or state.device.type != "cpu" or not state.is_contiguous()
                or tuple(state.shape) != (self.num_layers, batch, d)):
            raise KernelInputError(f"fused step: state must be contiguous float32 CPU "
                                   f"[{self.num_layers}, {batch}, {d}], got {state.dtype} {list(state.shape)}")
        mask_ptr = 0
        if mask is not None:
            mask = mask.reshape(-1).to(torch.float32).contiguous()
            if mask.numel() != batch:
                raise KernelInputError(f"fused step: mask must have {batch} values, got {mask.numel()}")
            mask_ptr = mask.data_ptr()
        name = _resolve_isa(isa)
        threads = _threads()
        step, _ = _exp()
        x = self.embeddings.index_select(0, input_ids.reshape(-1)).to(torch.float32).contiguous()
        logits = torch.empty((batch, v), dtype=torch.float32)
        if batch == 0:
            return logits.view(0, 1, v)
        with self._lock:
            ws = self._workspace(batch, name, threads)
            _kernels._c.hgrn_step(ws, self.plan.data_ptr(), self.scales.data_ptr(), self.eps, _width(), step,
                                  threads, x.data_ptr(), state.data_ptr(), mask_ptr, logits.data_ptr())
        return logits.view(batch, 1, v)
