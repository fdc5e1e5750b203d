"""Writing a packed bitnet checkpoint: the shared writer (memwise.models.ternary.writer) over this
family's layout, from any of the three stored forms (memwise.models.bitnet.weights).

The written config.json has no quantization_config: the tensors follow memwise's packed format, not
transformers' (a reader tells them apart by the safetensors metadata, not by the config).
Converting a packed checkpoint again copies its tensors unchanged: the output is identical.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from memwise.checkpoint import CheckpointReader
from memwise.models.bitnet.build import check_layout
from memwise.models.bitnet.layout import checkpoint_layout
from memwise.models.bitnet.weights import weight_source
from memwise.models.ternary.writer import write_packed as write_slots
from memwise.spec import ModelSpec


def write_packed(spec: ModelSpec, reader: CheckpointReader, config: dict[str, Any], out: Path,
                 progress: bool = True) -> None:
    """The packed checkpoint of the model in `reader` into directory `out`."""
    if spec.model_type == "llama" and not spec.tie_word_embeddings and "lm_head.weight" not in reader:
        # 1bitLLM's checkpoints hold no lm_head whatever their config says (as build.load reads them):
        # the packed config says tied, so that every reader of the packed file agrees.
        spec = dataclasses.replace(spec, tie_word_embeddings=True)
        config = {**config, "tie_word_embeddings": True}
    source = weight_source(reader)
    check_layout(spec, reader, source)
    config = {key: value for key, value in config.items() if key not in ("quantization_config", "memwise")}
    write_slots(checkpoint_layout(spec), source, reader, config, out, progress)
