"""Memory probes for one process, and the estimate a cell is checked against before it runs.

On Linux the kernel keeps a resident-set high-water mark per process (VmHWM in /proc/self/status)
and resets it to the current resident set when "5" is written to /proc/self/clear_refs. A cell reads
it after loading (the load peak), resets it, generates, and reads it again (the generation peak).

The reset also resets what a parent later sees as the child's ru_maxrss (wait4 and getrusage read the
same high-water mark at exit), so that measurement from outside only covers the time since the last
reset; launcher.py therefore also samples the cell's resident set while it runs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from memwise.errors import MemwiseError

if TYPE_CHECKING:   # the probes run in cells that never import torch (llama.cpp's); the rest imports it lazily
    from memwise.spec import ModelSpec

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")

# Resident set of a cell besides weights, cache and activations: the interpreter, torch, memwise or
# transformers' modeling code, and allocator slack. Measured on Linux x86-64 with torch 2.13 and
# transformers 5 at about 340 MiB and 400 MiB; rounded up because a skipped cell costs less than a
# killed one.
BASELINE_BYTES = {"memwise": 400 * 2**20, "memwise-lite": 64 * 2**20, "transformers": 512 * 2**20,
                  "llama.cpp": 160 * 2**20}

# Bytes per weight of the GGUF types a llama.cpp cell's dtype names (block bytes / block weights).
GGUF_BYTES_PER_WEIGHT = {"F32": 4.0, "F16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32, "TQ2_0": 66 / 256,
                         "TQ1_0": 54 / 256}
DEFAULT_BASELINE_BYTES = 512 * 2**20


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """This process's resident set now (VmRSS), in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # non-Linux: no /proc; psutil knows the platform's call

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """This process's resident high-water mark since start or the last reset (VmHWM), in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident set; False where the kernel cannot."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Architecture:
    """What the estimate needs to know about a model, from its config.json alone."""

    model_type: str
    parameters: int
    layers: int
    hidden_size: int
    vocab_size: int
    kv_width: int                 # key (= value) width per layer per token; 0 for a recurrent model
    state_width: int              # recurrent state floats per layer per sequence; 0 for attention
    max_positions: int | None     # a hard limit only for learned position tables
    intermediate_size: int


def _memwise_model(config: dict[str, Any]) -> tuple[ModuleType, ModelSpec] | None:
    """memwise's family and spec of a config, or None where memwise cannot run it (transformers may)."""
    from memwise.source import family_and_spec

    try:
        return family_and_spec(config, "config.json")
    except MemwiseError:
        return None


def architecture(config: dict[str, Any]) -> Architecture:
    """Summarize a Hugging Face config for memory estimates: from memwise's own family where it has one."""
    model = _memwise_model(config)
    if model is None:
        return _foreign_architecture(config)
    family, spec = model
    kv_width = spec.num_kv_heads * spec.head_dim
    # A model without attention heads (hgrn_bit) keeps a recurrent state per layer instead of a KV cache.
    state_width = 0 if kv_width else spec.hidden_size * spec.expand_ratio
    # Only learned position tables are a hard limit: longer inputs cannot run at all.
    max_positions = spec.max_positions if spec.positions == "learned" else None
    return Architecture(spec.model_type, family.parameter_count(spec), spec.num_layers, spec.hidden_size,
                        spec.vocab_size, kv_width, state_width, max_positions, spec.intermediate_size)


def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _foreign_architecture(config: dict[str, Any]) -> Architecture:
    """A config memwise has no family for, read by the field names most decoders use; the parameter
    count is transformers' (built on the meta device: no memory, no weights), or 0 without it."""
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(_first(config, "num_attention_heads", "n_head", default=1)) or 1
    kv_heads = int(_first(config, "num_key_value_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    inter = int(_first(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden)
    model_type = str(config.get("model_type", ""))
    max_positions = None
    if model_type in ("gpt2", "opt"):   # learned position tables
        max_positions = int(_first(config, "n_positions", "max_position_embeddings", default=0)) or None
    return Architecture(model_type, _transformers_parameters(config),
                        int(_first(config, "num_hidden_layers", "n_layer", "num_layers", default=0)), hidden,
                        int(_first(config, "vocab_size", default=0)), kv_heads * head_dim, 0, max_positions, inter)


def _transformers_parameters(config: dict[str, Any]) -> int:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return 0
    from memwise.bench.engines import transformers_config

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(transformers_config(config))
    except Exception:  # an architecture transformers does not know either
        return 0
    return sum(p.numel() for p in model.parameters())


def memwise_weights_bytes(config: dict[str, Any], dtype: str, quantize: str | None = None) -> int | None:
    """Bytes memwise's own family module says the weights take at `dtype`, or None if it cannot say."""
    from memwise.dtypes import parse_dtype
    from memwise.memory_gate import weights_bytes

    model = _memwise_model(config)
    if model is None:
        return None
    family, spec = model
    return weights_bytes(family, spec, parse_dtype(dtype), quantize)


def estimate_cell_bytes(arch: Architecture, engine: str, dtype: str, batch_size: int, prompt_tokens: int,
                        new_tokens: int, weights_bytes: int | None = None) -> int:
    """Resident memory a cell needs at its peak: baseline + weights + KV cache or state + activations.

    Deliberately a little generous: it only decides whether a cell is run at all.
    """
    from memwise.bench.gguf_format import GGUF_TYPES
    from memwise.dtypes import DTYPES, parse_dtype

    if engine == "llama.cpp" and dtype.lower() in GGUF_TYPES:
        gguf = GGUF_TYPES[dtype.lower()]
        width = 4 if gguf == "F32" else 2       # its KV cache and activations
        if weights_bytes is None:
            weights_bytes = int(arch.parameters * GGUF_BYTES_PER_WEIGHT[gguf])
    else:   # a GGUF type on another engine is skipped before it runs; 4 bytes keeps the estimate defined
        width = parse_dtype(dtype).itemsize if dtype in DTYPES else 4
    if weights_bytes is None:
        weights_bytes = arch.parameters * width
    length = prompt_tokens + new_tokens
    cache = 2 * arch.layers * batch_size * length * arch.kv_width * width
    state = arch.layers * batch_size * arch.state_width * 4
    # Prefill: a few hidden-sized and one MLP-sized activation per token, float32 logits for the
    # prompt (engines that keep only the last row use less), and one attention score matrix.
    heads = max(arch.kv_width // 64, 1) if arch.kv_width else 0
    activations = batch_size * prompt_tokens * (6 * arch.hidden_size + 2 * arch.intermediate_size) * width
    activations += batch_size * prompt_tokens * arch.vocab_size * 4
    activations += batch_size * heads * prompt_tokens * prompt_tokens * 4
    baseline = BASELINE_BYTES.get(engine, DEFAULT_BASELINE_BYTES)
    return int(baseline + weights_bytes + 1.1 * (cache + state) + activations)


def available_memory_bytes() -> int:
    import torch

    from memwise.memory_gate import available_bytes

    return available_bytes(torch.device("cpu"))
