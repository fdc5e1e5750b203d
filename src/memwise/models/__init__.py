"""Model families. Each family is one package that turns a config into a ModelSpec and builds the model.

A family package provides:

    MODEL_TYPES: tuple[str, ...]                           config.json model_type values it handles
    spec_from_config(config: dict, where: str) -> ModelSpec  errors name `where` (the config path)
    load(spec, reader: CheckpointReader, dtype, device) -> CausalLM    real weights, streamed
    synthetic(spec, dtype, device, seed: int) -> CausalLM              random weights, no download
    parameter_count(spec) -> int                           parameters of the checkpoint as released
    weight_sizes(spec) -> dict[str, int]                   bytes the loaded weights take, per storage kind

and its CausalLM (a torch.nn.Module) provides:

    spec: ModelSpec
    new_cache(batch_size, max_length) -> cache       preallocated per-sequence state
    cache_bytes(batch_size, max_length) -> int       what new_cache would allocate (the memory gate's figure)
    forward(input_ids [B, T], cache, attention_mask [B, T] bool (True = real token, False = left
            padding), last_only=False) -> float32 logits [B, T or 1, V]; advances the cache by T
    weights_bytes() -> int                           what the model holds for weights, in bytes
    decode_bytes_per_token() -> int                  weight bytes one decode step reads
"""
from __future__ import annotations

import importlib
from types import ModuleType

from memwise.errors import UnsupportedError, shown

# model_type -> module; imported on first use so that `memwise --help` stays fast.
FAMILY_MODULES = {
    "gpt2": "memwise.models.decoder",
    "opt": "memwise.models.decoder",
    "phi": "memwise.models.decoder",
    "llama": "memwise.models.decoder",
    "mistral": "memwise.models.decoder",
    "hgrn_bit": "memwise.models.hgrn_bit",
    "bitnet": "memwise.models.bitnet",
}


# Checkpoints whose config.json names another family's model_type and tells what it is by the
# architecture its custom code defines: 1bitLLM's BitNet b1.58 models are "llama" + BitnetForCausalLM.
ARCHITECTURE_FAMILIES = {("llama", "BitnetForCausalLM"): "memwise.models.bitnet"}


def family_for_config(config: dict, where: str) -> ModuleType:
    """The family that runs `config`: by its model_type, unless its architecture says otherwise."""
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if isinstance(model_type, str) and isinstance(architectures, list):
        for architecture in architectures:
            module = ARCHITECTURE_FAMILIES.get((model_type, architecture)) if isinstance(architecture, str) else None
            if module is not None:
                return importlib.import_module(module)
    return family_for(model_type, where)


def family_for(model_type: object, where: str) -> ModuleType:
    if not isinstance(model_type, str) or model_type not in FAMILY_MODULES:
        supported = ", ".join(sorted(FAMILY_MODULES))
        raise UnsupportedError(f"{where}: model_type {shown(model_type)} is not supported (supported: {supported})")
    return importlib.import_module(FAMILY_MODULES[model_type])
