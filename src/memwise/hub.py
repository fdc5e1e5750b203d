"""Resolving a model source: a local directory, or a Hugging Face hub id downloaded into the hub cache."""
from __future__ import annotations

import os
from pathlib import Path

from memwise.errors import SourceError

# What a model needs from a repository; the big alternatives (.bin, .h5, .msgpack, onnx) stay behind.
CONFIG_PATTERNS = ["*.json", "tokenizer.model"]
SAFETENSORS_PATTERNS = ["*.safetensors"]
TORCH_PATTERNS = ["pytorch_model*.bin"]


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local model directory for `source`, downloading a hub id's files when needed (and allowed)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{path}: is a file; a model source is a directory with config.json, a hub id, "
                          "or preset:NAME")
    text = str(source)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text:
        raise SourceError(f"{text}: no such directory")
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        directory = Path(snapshot_download(repo_id, revision=revision,
                                           allow_patterns=CONFIG_PATTERNS + SAFETENSORS_PATTERNS))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(repo_id, revision=revision,
                                               allow_patterns=CONFIG_PATTERNS + TORCH_PATTERNS))
    except HFValidationError:
        raise SourceError(f"{repo_id}: not a local directory, and not a valid hub id") from None
    except GatedRepoError:
        raise SourceError(f"{repo_id}: gated on the Hugging Face hub; accept its terms and log in "
                          "(`huggingface-cli login`)") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{repo_id}: no such local directory or hub repository") from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo_id}: revision {revision!r} not found on the hub") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise SourceError(f"{repo_id}: not in the Hugging Face cache and {why}; on a machine with internet "
                          f"run `huggingface-cli download {repo_id}` (then copy the cache) or pass a local "
                          "directory") from None
    except OSError as e:
        raise SourceError(f"{repo_id}: download failed ({e})") from None
    return directory
