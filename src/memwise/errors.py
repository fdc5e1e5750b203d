"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class MemwiseError(Exception):
    """Base class: a user's mistake or an environment problem, with a message that says what and where."""


class ConfigError(MemwiseError):
    """config.json is missing, malformed, or describes something memwise cannot run."""


class CheckpointError(MemwiseError):
    """A weights file is missing, truncated, corrupt, or holds a tensor of the wrong name or shape."""


class SourceError(MemwiseError):
    """A model source (directory, hub id, preset name) cannot be resolved."""


class UnsupportedError(MemwiseError):
    """A valid request memwise does not support (dtype, device, model family, option)."""


def shown(value: object, limit: int = 60) -> str:
    """A value a user gave, for a message, cut short: a config field can hold a megabyte of JSON."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
