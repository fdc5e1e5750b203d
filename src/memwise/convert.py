"""`memwise convert SOURCE OUT`: a model's checkpoint rewritten in the form memwise runs it from.

Only families with a packed form convert (today hgrn_bit: ternary matrices at 2 bits, see
memwise/models/hgrn_bit/convert.py); the family writes the weights and config. Everything is written
into a temporary directory next to OUT, which is renamed to OUT only when complete: a failed
conversion leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from memwise.checkpoint import CheckpointReader
from memwise.errors import MemwiseError, SourceError, UnsupportedError
from memwise.presets import is_preset
from memwise.models import family_for
from memwise.source import read_source

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def convert(source: str, out_dir: Path, progress: bool = True) -> Path:
    """Write the converted checkpoint of `source` (directory or hub id) into the new directory `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise MemwiseError(f"{out_dir}: already exists; convert writes a new directory")
    if not out_dir.parent.is_dir():
        raise MemwiseError(f"{out_dir.parent}: no such directory (for the output {out_dir.name})")
    if is_preset(str(source)):
        raise SourceError(f"{source}: presets have random weights; convert needs a checkpoint "
                          "(a model directory or hub id)")
    config, where, directory = read_source(source)
    family = family_for(config.get("model_type"), where)
    if not hasattr(family, "write_packed"):    # refused from the model type alone, before the config's fields
        raise UnsupportedError(f"{where}: convert supports hgrn_bit (MatMul-free) models only; this is "
                               f"model_type {config.get('model_type')!r}, which memwise runs from its own "
                               "checkpoint without conversion")
    spec = family.spec_from_config(config, where)
    reader = CheckpointReader(directory)

    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        family.write_packed(spec, reader, config, tmp, progress)
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, tmp / name)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
