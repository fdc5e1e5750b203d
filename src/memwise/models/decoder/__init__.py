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
from memwise.models.decoder.build import load, synthetic
from memwise.models.decoder.config import MODEL_TYPES, spec_from_config
from memwise.models.decoder.layout import TensorSource, checkpoint_plan, parameter_count, weight_sizes
from memwise.models.decoder.modules import Decoder, DecoderCache, rotary_inv_freq
from memwise.models.decoder.quantized import Int8Linear, quantized_weights_bytes
from memwise.models.decoder.quantized_checkpoint import load_quantized, stored_scheme, write_quantized

__all__ = ["MODEL_TYPES", "Decoder", "DecoderCache", "Int8Linear", "TensorSource", "checkpoint_plan", "load",
           "parameter_count", "quantized_weights_bytes", "rotary_inv_freq", "spec_from_config", "synthetic", "weight_sizes",
           "load_quantized", "stored_scheme", "write_quantized"]
