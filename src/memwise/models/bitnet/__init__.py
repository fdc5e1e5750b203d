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

Attention, its cache and rotary embedding are the decoder family's (memwise.models.decoder.modules).
"""
from memwise.models.bitnet.build import check_layout, load, synthetic
from memwise.models.bitnet.config import MODEL_TYPES, spec_from_config
from memwise.models.bitnet.convert import write_packed
from memwise.models.bitnet.layout import checkpoint_layout, parameter_count, weight_sizes
from memwise.models.bitnet.modules import BACKENDS, BitNetBlock, BitNetForCausalLM, GatedMLP, TernaryProjection
from memwise.models.bitnet.weights import TransformersPacked, weight_source

__all__ = ["BACKENDS", "MODEL_TYPES", "BitNetBlock", "BitNetForCausalLM", "GatedMLP", "TernaryProjection",
           "TransformersPacked", "check_layout", "checkpoint_layout", "load", "parameter_count", "spec_from_config",
           "synthetic", "weight_sizes", "weight_source", "write_packed"]
