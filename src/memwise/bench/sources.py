"""Turning a --model argument into something both engines can load, and saying whose weights it has.

A preset name that has a hub checkpoint ("gpt2-medium", "mmfree-370m") or that checkpoint's hub id
uses the real weights when they are already in the local hub cache, and otherwise the preset of the
identical architecture with random weights: the bench never downloads gigabytes for its own suites.
Any other argument is a local directory, "preset:NAME", or a hub id (fetched before any cell runs,
so no cell times a download).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class Source:
    name: str                           # shown in tables, e.g. "gpt2-medium"
    source: str                         # what engines load: a directory, a hub id, or "preset:NAME"
    kind: str                           # "local" | "hub" | "preset"
    weights: str                        # "real" | "synthetic"
    config: dict[str, Any] | None = None
    problem: str | None = None          # why no engine can run it (unknown preset, unreadable config)
    requested: str = ""                 # the --model argument as given
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str | None:
        return None if self.config is None else self.config.get("model_type")


def known_model(text: str) -> tuple[str, list[str]] | None:
    """(preset name, hub ids to look for in the cache) for a preset name or its hub id, else None."""
    from memwise.presets import HUB_IDS

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


def _preset_source(name: str, display: str, requested: str) -> Source:
    from memwise.errors import MemwiseError
    from memwise.presets import preset_config

    source = Source(display, f"preset:{name}", "preset", "synthetic", requested=requested)
    try:
        source.config = preset_config(name)
    except MemwiseError as e:  # an unknown name: the message lists the presets there are
        source.problem = str(e)
    return source


def _local_source(path: Path, display: str, requested: str) -> Source:
    from memwise.spec import read_config

    from memwise.errors import MemwiseError

    source = Source(display, str(path), "local", "real", requested=requested)
    try:
        source.config = read_config(path)
    except MemwiseError as e:  # ConfigError names the file already
        source.problem = str(e)
    return source


def _hub_source(hub_id: str, requested: str) -> Source:
    """A hub id outside the presets: fetched (once, before any cell) so no cell times a download."""
    from memwise.errors import MemwiseError
    from memwise.hub import resolve_source

    try:
        directory = resolve_source(hub_id)
    except MemwiseError as e:
        return Source(hub_id, hub_id, "hub", "real", requested=requested, problem=str(e))
    source = _local_source(directory, hub_id, requested)
    source.extra["hub_id"] = hub_id
    return source


def resolve(text: str) -> Source:
    """The Source for one --model argument; problems (unknown preset, bad config) are recorded on it."""
    if text.startswith("preset:"):
        name = text.split(":", 1)[1]
        return _preset_source(name, name, text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _local_source(path.resolve(), path.resolve().name, text)
    known = known_model(text)
    if known is not None:
        name, hub_ids = known
        for hub_id in hub_ids:
            snapshot = cached_snapshot(hub_id)
            if snapshot is not None:
                source = _local_source(snapshot, name, text)
                source.extra["hub_id"] = hub_id
                return source
        return _preset_source(name, name, text)
    if path.exists() or text.startswith((".", "/", "~")):
        return Source(path.name or text, str(path), "local", "real", requested=text,
                      problem=f"{path}: not a model directory (expected a directory with config.json)")
    return _hub_source(text, text)
