"""A model source (preset:NAME, a local directory, a hub id) resolved to its config, family and ModelSpec.

memwise.load, `memwise info`, `memwise convert` and the bench all start here, so that a source means
the same thing everywhere and every error names the same file.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from memwise.errors import SourceError, shown
from memwise.hub import resolve_source
from memwise.models import family_for_config
from memwise.presets import PRESET_PREFIX, is_preset, preset_config, preset_name
from memwise.spec import ModelSpec, read_config


@dataclass(frozen=True)
class ModelSource:
    config: dict[str, Any]      # config.json as read, or the preset's built-in config
    where: str                  # "preset:NAME" or the path of config.json: what errors name
    family: ModuleType          # the memwise.models family package that runs it
    spec: ModelSpec             # with .source and .synthetic set
    directory: Path | None      # the local model directory (a hub id's download); None for a preset

    @property
    def synthetic(self) -> bool:
        """A preset: the architecture without a checkpoint, run on random weights."""
        return self.directory is None


def read_source(source: str | Path, revision: str | None = None) -> tuple[dict[str, Any], str, Path | None]:
    """(config, where, directory) of a source, reading nothing but its config; a hub id not in the local
    cache is downloaded (config and weights) first. Models memwise cannot run resolve too."""
    if not isinstance(source, (str, os.PathLike)):
        raise SourceError(f"a model source should be a path, a hub id or preset:NAME (a str), found {shown(source)}")
    text = os.fspath(source)
    if not text.strip():
        raise SourceError("the model source is empty: give a model directory, a hub id or preset:NAME")
    if is_preset(text):
        return preset_config(text), PRESET_PREFIX + preset_name(text), None
    directory = resolve_source(text, revision)
    return read_config(directory), str(directory / "config.json"), directory


def family_and_spec(config: dict[str, Any], where: str) -> tuple[ModuleType, ModelSpec]:
    """The family that runs a config, and the ModelSpec it makes of it (errors name `where`)."""
    family = family_for_config(config, where)
    return family, family.spec_from_config(config, where)


def resolve_model(source: str | Path, revision: str | None = None) -> ModelSource:
    """Everything memwise knows about a source before reading any weights."""
    config, where, directory = read_source(source, revision)
    family, spec = family_and_spec(config, where)
    spec = dataclasses.replace(spec, source=str(source), synthetic=directory is None)
    return ModelSource(config, where, family, spec, directory)
