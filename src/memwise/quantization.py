"""Weight quantization schemes by name (issue 19): what `memwise.load(..., quantize=NAME)`,
`--quantize`, `memwise info` and the benchmark records accept and report.

A scheme applies to the conventional decoder family; MatMul-free (hgrn_bit) checkpoints are already
ternary. The model code of each scheme lives with its family (memwise/models/decoder/quantized.py),
its format and products in memwise/kernels (int8.py, int4.py, nf4.py). Under every scheme the
lm_head is int8 (llama.cpp keeps its output tensor at higher precision for the same reason: 4-bit
rounding there moves the logits directly).
"""
from __future__ import annotations

from dataclasses import dataclass

from memwise.errors import MemwiseError


@dataclass(frozen=True)
class Scheme:
    name: str
    bytes_per_weight: float     # of the layers' quantized matrices with their group constants, before per-row ones
    implemented: bool
    summary: str


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("int8", 1.0, True, "int8 per output row (symmetric), int8 activations per token"),
    Scheme("int4", 0.5625, True, "4-bit codes in groups of 64 (asymmetric min/max, float16 scale and zero), "
           "int8 activations per token (W4A8)"),
    Scheme("nf4", 0.516, True, "bitsandbytes NF4, blocks of 64, double-quantized absmax; float activations"),
)}
# Storage sizes per weight that `memwise info` lists beside the schemes.
BYTES_PER_PARAMETER = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5625, "nf4": 0.516,
                       "ternary (packed 2-bit)": 0.25}


class QuantizeError(MemwiseError, ValueError):
    """An unknown or unsupported quantization scheme."""


def check_scheme(name: object, model_type: str | None = None) -> str | None:
    """The scheme's name (None: no quantization), or one clear error for an unknown or unimplemented
    scheme, or for a model family that a scheme does not apply to."""
    if name is None:
        return None
    known = ", ".join(s.name for s in SCHEMES.values() if s.implemented)
    if not isinstance(name, str) or name.strip().lower() not in SCHEMES:
        raise QuantizeError(f"unknown quantization scheme {name!r} (known: {known})")
    scheme = SCHEMES[name.strip().lower()]
    if not scheme.implemented:
        raise QuantizeError(f"quantization scheme {scheme.name!r} is not implemented yet (implemented: {known})")
    if model_type == "hgrn_bit":
        raise QuantizeError(f"hgrn_bit models are already ternary (packed 2-bit); quantize={scheme.name!r} applies "
                            "to conventional decoders (gpt2, opt, phi, llama, mistral)")
    return scheme.name


KV_CACHE_BYTES_PER_NUMBER = {"int8": 1.0625, "int4": 0.625}   # at head_dim 64 (memwise.kernels.kv_quant)


def check_kv_scheme(name: object, model_type: str | None = None) -> str | None:
    """The KV cache scheme's name (None: the cache keeps the model's dtype), or one clear error for an
    unknown scheme or a model without a KV cache."""
    if name is None:
        return None
    known = ", ".join(KV_CACHE_BYTES_PER_NUMBER)
    if not isinstance(name, str) or name.strip().lower() not in KV_CACHE_BYTES_PER_NUMBER:
        raise QuantizeError(f"unknown KV cache scheme {name!r} (known: {known})")
    if model_type == "hgrn_bit":
        raise QuantizeError(f"hgrn_bit models have no KV cache (their recurrent state has a fixed size); "
                            f"kv_cache={name.strip().lower()!r} applies to attention models")
    return name.strip().lower()
