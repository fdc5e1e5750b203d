"""The ctypes mirrors of the C structs of the fused BitNet step (csrc/bitnet_model.h), and the extension:
the same arrangement as memwise.models.hgrn_bit.step_structs (checked against the built extension
once, no torch, filled by both the torch path and memwise.lite)."""
from __future__ import annotations

import ctypes
import functools

from memwise.kernels.structs import require_agreement, struct_mismatches

try:
    from memwise.models.bitnet import _step
except ImportError:  # built without a C compiler: decode steps run the PyTorch modules
    _step = None

__all__ = ["MIRRORS", "LayerView", "ModelView", "ProjectionView", "checked_layout", "layout_mismatches"]


class ProjectionView(ctypes.Structure):
    """bitnet_projection_t: stacked ternary matrices, their input-norm gain, rows and scales."""
    _fields_ = [("codes", ctypes.c_void_p), ("gain", ctypes.c_void_p), ("rows", ctypes.c_int64 * 3),
                ("scales", ctypes.c_float * 3), ("count", ctypes.c_int32)]


class LayerView(ctypes.Structure):
    """bitnet_layer_t: one layer's projections and its cache tensors."""
    _fields_ = [("qkv", ProjectionView), ("o", ProjectionView), ("gate_up", ProjectionView),
                ("down", ProjectionView), ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


class ModelView(ctypes.Structure):
    """bitnet_model_t: sizes, rotary frequencies and the layers."""
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("max_length", ctypes.c_int64), ("eps", ctypes.c_float), ("relu2", ctypes.c_int32),
                ("weights_from_dram", ctypes.c_int32), ("inv_freq", ctypes.c_void_p),
                ("layers", ctypes.POINTER(LayerView))]


MIRRORS = {"bitnet_projection_t": ProjectionView, "bitnet_layer_t": LayerView, "bitnet_model_t": ModelView}


def projection_view(codes: int, gain: int, rows: tuple[int, ...], scales: tuple[float, ...]) -> ProjectionView:
    """The view of `len(rows)` (at most 3) matrices stacked by rows in one buffer of codes."""
    view = ProjectionView(codes=codes, gain=gain, count=len(rows))
    for k, (n, m) in enumerate(zip(rows, scales)):
        view.rows[k], view.scales[k] = n, m
    return view


def layout_mismatches() -> list[str]:
    """How the ctypes mirrors differ from the C structs of the built extension (empty: they agree)."""
    return struct_mismatches(_step.struct_layout(), MIRRORS)


@functools.cache
def checked_layout() -> None:
    """Raise unless the mirrors agree with the built extension's structs (checked once per process)."""
    require_agreement("memwise.models.bitnet._step", layout_mismatches())
