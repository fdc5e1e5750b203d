"""The ctypes mirrors of the C structs of the fused HGRN-Bit step (csrc/hgrn_model.h), and the extension.

`checked_layout()` refuses to run when the built extension reports other sizes or offsets
(memwise.kernels.structs). No torch here: the torch path (fused_step.py) and the torch-free runtime
(memwise.lite) fill the same structs with pointers into their own buffers.
"""
from __future__ import annotations

import ctypes
import functools

from memwise.kernels.structs import require_agreement, struct_mismatches

try:
    from memwise.models.hgrn_bit import _step
except ImportError:  # built without a C compiler: decode steps run the PyTorch modules
    _step = None

__all__ = ["MIRRORS", "BitLinearView", "LayerView", "ModelView", "checked_layout", "layout_mismatches"]


class BitLinearView(ctypes.Structure):
    """hgrn_bitlinear_t: one BitLinear's packed codes, input-norm gain and scale."""
    _fields_ = [("codes", ctypes.c_void_p), ("gain", ctypes.c_void_p), ("scale", ctypes.c_float)]


class LayerView(ctypes.Structure):
    """hgrn_layer_t: one layer's norms and BitLinears."""
    _fields_ = [("attn_norm", ctypes.c_void_p), ("i_proj", BitLinearView), ("f_proj", BitLinearView),
                ("g_proj", BitLinearView), ("g_norm", ctypes.c_void_p), ("o_proj", BitLinearView),
                ("mlp_norm", ctypes.c_void_p), ("gate_proj", BitLinearView), ("down_proj", BitLinearView),
                ("lower_bound", ctypes.c_void_p)]


class ModelView(ctypes.Structure):
    """hgrn_model_t: sizes, the final norm, the lm_head and the layers."""
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("width", ctypes.c_int64),
                ("intermediate", ctypes.c_int64), ("vocab", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("eps", ctypes.c_float), ("weights_from_dram", ctypes.c_int32), ("final_norm", ctypes.c_void_p),
                ("lm_head", BitLinearView), ("layers", ctypes.POINTER(LayerView))]


MIRRORS = {"hgrn_bitlinear_t": BitLinearView, "hgrn_layer_t": LayerView, "hgrn_model_t": ModelView}


def layout_mismatches() -> list[str]:
    """How the ctypes mirrors differ from the C structs of the built extension (empty: they agree)."""
    return struct_mismatches(_step.struct_layout(), MIRRORS)


@functools.cache
def checked_layout() -> None:
    """Raise unless the mirrors agree with the built extension's structs (checked once per process)."""
    require_agreement("memwise.models.hgrn_bit._step", layout_mismatches())
