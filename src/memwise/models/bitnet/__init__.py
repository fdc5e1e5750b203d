"""BitNet b1.58 (model_type "bitnet": microsoft/bitnet-b1.58-2B-4T; and 1bitLLM's Llama-shaped
bitnet_b1_58-large / -3B), ternary projections on memwise's integer kernels, attention in float32
over a KV cache.

The family's code, one idea per module, in the order a model goes through it:

    config.py   config.json -> ModelSpec (BitNetConfig's defaults, the quantization_config it runs)
    layout.py   every tensor of a checkpoint, parameter count, weight sizes
    weights.py  the three stored forms (latent, transformers packed, memwise packed) as weight sources
    modules.py  the torch modules (TernaryProjection, the ReLU^2 GLU, the CausalLM) = the specification
    build.py    the model from a source, codes in one buffer
    convert.py  writing a packed checkpoint (memwise.models.ternary's writer over this layout)
    step_structs.py  the fused decode step's C structs and extension, without torch (fused_step.py, memwise.lite)
    fused_step.py    the fused decode step over the torch model's buffers

Attention, its cache and rotary embedding are the decoder family's (memwise.models.decoder.modules).
"""
import importlib

from memwise.models.bitnet.config import MODEL_TYPES, spec_from_config
from memwise.models.bitnet.layout import checkpoint_layout, parameter_count, weight_sizes

# The torch modules and what builds them are imported on first use: the config, the layout and the
# fused step's structs (step_structs.py) serve the torch-free runtime (memwise.lite) without torch.
_LAZY = {**dict.fromkeys(("check_layout", "load", "synthetic"), "memwise.models.bitnet.build"),
         "write_packed": "memwise.models.bitnet.convert",
         **dict.fromkeys(("BACKENDS", "BitNetBlock", "BitNetForCausalLM", "GatedMLP", "TernaryProjection"),
                         "memwise.models.bitnet.modules"),
         **dict.fromkeys(("TransformersPacked", "weight_source"), "memwise.models.bitnet.weights")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "MODEL_TYPES", "BitNetBlock", "BitNetForCausalLM", "GatedMLP", "TernaryProjection",
           "TransformersPacked", "check_layout", "checkpoint_layout", "load", "parameter_count", "spec_from_config",
           "synthetic", "weight_sizes", "weight_source", "write_packed"]
