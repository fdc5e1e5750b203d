"""Writing a packed hgrn_bit checkpoint: the shared writer (memwise.models.ternary.writer) over this
family's layout, with the released (latent) or an already packed checkpoint as the source.

Converting a packed checkpoint again copies its tensors unchanged: the output is identical.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from memwise.checkpoint import CheckpointReader
from memwise.models.hgrn_bit.build import check_layout, weight_source
from memwise.models.hgrn_bit.layout import checkpoint_layout
from memwise.models.ternary.packed_format import is_packed
from memwise.models.ternary.writer import write_packed as write_slots
from memwise.spec import ModelSpec


def write_packed(spec: ModelSpec, reader: CheckpointReader, config: dict[str, Any], out: Path,
                 progress: bool = True) -> None:
    """The packed checkpoint of the model in `reader` (latent or packed) into directory `out`."""
    check_layout(spec, reader, str(reader.directory), is_packed(reader))
    write_slots(checkpoint_layout(spec), weight_source(spec, reader), reader, config, out, progress)
