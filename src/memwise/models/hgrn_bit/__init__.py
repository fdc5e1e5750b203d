"""HGRN-Bit, the MatMul-free language model family (ridger/MMfreeLM-*), with 2-bit packed ternary weights.

The family's code, one idea per module, in the order a model goes through it:

    config.py         config.json -> ModelSpec (the reference code's defaults and limits)
    layout.py         every tensor of a checkpoint, parameter count, weight sizes
    modules.py        the torch modules (BitLinear, MLGRU, GLU, the CausalLM) = the specification
    build.py          the model from a source, codes in one buffer
    convert.py        writing a packed checkpoint (memwise.models.ternary's writer over this layout)
    fused_step.py     one C call per decode step (csrc/: the step over the kernel library)
    step_structs.py   the ctypes mirrors of the step's C structs (no torch: memwise.lite uses them too)

Checkpoints come in two layouts, told apart by the safetensors metadata: latent (as released:
`NAME.weight` float matrices, quantized at load) and packed (`NAME.weight.packed` and
`NAME.weight.scale`, read as they are). The packed format, the weight sources and the writer are
shared with the other ternary family (bitnet) in memwise.models.ternary.
"""
import importlib

from memwise.models.hgrn_bit.config import MODEL_TYPES, recurrence_width, spec_from_config
from memwise.models.hgrn_bit.layout import checkpoint_layout, latent_name, packed_bytes, parameter_count, weight_sizes
from memwise.models.ternary import (PACKED_FORMAT, PACKED_FORMAT_VERSION, PACKED_SUFFIX, SCALE_SUFFIX, TensorSlot,
                                    check_packed_codes, is_packed, read_packed)

# The torch modules and what builds them are imported on first use: the config, the layout and the
# fused step's extension (_step) serve the torch-free runtime (memwise.lite) without torch.
_LAZY = {**dict.fromkeys(("check_layout", "load", "synthetic"), "memwise.models.hgrn_bit.build"),
         "write_packed": "memwise.models.hgrn_bit.convert",
         **dict.fromkeys(("BACKENDS", "GLU", "MLGRU", "BitLinear", "HGRNBitBlock", "HGRNBitForCausalLM", "RecurrentCache",
                          "recurrence"), "memwise.models.hgrn_bit.modules"),
         **dict.fromkeys(("random_ternary", "ternarize"), "memwise.models.ternary.weights")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "GLU", "MLGRU", "MODEL_TYPES", "PACKED_FORMAT", "PACKED_FORMAT_VERSION", "PACKED_SUFFIX",
           "SCALE_SUFFIX", "BitLinear", "HGRNBitBlock", "HGRNBitForCausalLM", "RecurrentCache", "TensorSlot",
           "check_layout", "check_packed_codes", "checkpoint_layout", "is_packed", "latent_name", "load",
           "packed_bytes", "parameter_count", "random_ternary", "read_packed", "recurrence", "recurrence_width",
           "spec_from_config", "synthetic", "ternarize", "weight_sizes", "write_packed"]
