"""Turning a --model argument into something both engines can load, and saying whose weights it has.

A preset name that has a hub checkpoint ("gpt2-medium", "mmfree-370m") or that checkpoint's hub id
uses the real weights when they are already in the local hub cache, and otherwise the preset of the
identical architecture with random weights: the bench never downloads gigabytes for its own suites.
Any other argument is a local directory, "preset:NAME", or a hub id (fetched before any cell runs,
so no cell times a download).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memwise.errors import MemwiseError
from memwise.presets import HUB_IDS, PRESET_PREFIX, is_preset, preset_name
from memwise.source import read_source

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class Source:
    name: str                           # shown in tables, e.g. "gpt2-medium"
    source: str                         # what engines load: a directory, a hub id, or "preset:NAME"
    kind: str                           # "local" | "hub" | "preset"
    weights: str                        # "real" | "synthetic"
    config: dict[str, Any] | None = None
    problem: str | None = None          # why no engine can run it (unknown preset, unreadable config)

    @property
    def model_type(self) -> str | None:
        return None if self.config is None else self.config.get("model_type")


def known_model(text: str) -> tuple[str, list[str]] | None:
    """(preset name, hub ids to look for in the cache) for a preset name or its hub id, else None."""
    wanted = text.strip().lower()
    for name, hub_id in HUB_IDS.items():
        if wanted in (name.lower(), hub_id.lower()):
            # gpt2-medium and gpt2-xl also live under their old top-level ids
            return name, [hub_id, name]
    return None


def cached_snapshot(hub_id: str) -> Path | None:
    """The local snapshot directory of a hub model whose config and weights are already cached."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub: both mean "no real weights here"
        return None
    if not (path / "config.json").is_file():
        return None
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        return None
    return path


def _read(name: str, source: str, kind: str) -> Source:
    """The Source of a preset, a local directory or a hub id (fetched once, before any cell, so that no
    cell times a download), with its config; a problem is recorded on it, not raised."""
    weights = "synthetic" if kind == "preset" else "real"
    try:
        config, _, directory = read_source(source)
    except MemwiseError as e:  # an unknown preset lists the presets there are; a bad config names its file
        return Source(name, source, kind, weights, problem=str(e))
    if directory is None:
        return Source(name, source, kind, weights, config)
    return Source(name, str(directory), "local", weights, config)   # a hub id: the directory it is in


def resolve(text: str) -> Source:
    """The Source for one --model argument; problems (unknown preset, bad config) are recorded on it."""
    if is_preset(text):
        return _read(preset_name(text), text, "preset")
    path = Path(text).expanduser()
    if path.is_dir():
        return _read(path.resolve().name, str(path.resolve()), "local")
    known = known_model(text)
    if known is not None:
        name, hub_ids = known
        for hub_id in hub_ids:
            snapshot = cached_snapshot(hub_id)
            if snapshot is not None:
                return _read(name, str(snapshot), "local")
        return _read(name, PRESET_PREFIX + name, "preset")
    if path.exists() or text.startswith((".", "/", "~")):
        return Source(path.name or text, str(path), "local", "real",
                      problem=f"{path}: not a model directory (expected a directory with config.json)")
    return _read(text, text, "hub")
