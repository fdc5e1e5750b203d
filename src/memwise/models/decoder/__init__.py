"""Conventional decoder Transformers (gpt2, opt, phi, llama, mistral): one family, one Decoder.

The family's code, one idea per module, in the order a model goes through it:

    config.py    config.json -> ModelSpec: each family's field names, defaults and limits
    layout.py    where each parameter comes from in a checkpoint; parameter count, weight sizes
    modules.py   the torch modules: attention over a static KV cache, MLP, norms, rotary, the Decoder
    build.py     the Decoder with a checkpoint's weights (streamed) or with random ones
    quantized.py the int8 linears (quantize="int8") and the bytes the quantized model holds
    cache.py     the KV cache, in the model's dtype or quantized (kv_cache="int8" | "int4")
    fused_step.py  the decode step of int8 / int4 models as one C call for all layers (csrc/)
    quantized_checkpoint.py  memwise's quantized checkpoint (memwise convert --quantize)
"""
import importlib

from memwise.models.decoder.config import MODEL_TYPES, spec_from_config

# The torch modules are imported on first use: the config (rope fields) also serves the torch-free
# runtime (memwise.lite, through the bitnet family's config) without torch.
_LAZY = {**dict.fromkeys(("load", "synthetic"), "memwise.models.decoder.build"),
         **dict.fromkeys(("TensorSource", "checkpoint_plan", "parameter_count", "weight_sizes"),
                         "memwise.models.decoder.layout"),
         **dict.fromkeys(("Decoder", "DecoderCache", "rotary_inv_freq"), "memwise.models.decoder.modules"),
         **dict.fromkeys(("Int8Linear", "quantized_weights_bytes"), "memwise.models.decoder.quantized"),
         **dict.fromkeys(("load_quantized", "stored_scheme", "write_quantized"),
                         "memwise.models.decoder.quantized_checkpoint")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODEL_TYPES", "Decoder", "DecoderCache", "Int8Linear", "TensorSource", "checkpoint_plan", "load",
           "parameter_count", "quantized_weights_bytes", "rotary_inv_freq", "spec_from_config", "synthetic", "weight_sizes",
           "load_quantized", "stored_scheme", "write_quantized"]
