"""Where an offload file lives, and whether its directory can take it (checked before writing)."""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

from memwise.offload.budget import format_size
from memwise.offload.store import OffloadError, StoreHeader, file_size


def store_path(directory: Path, source: str, dtype: str, scheme: str) -> Path:
    """One file per model and scheme: a readable slug of the source plus a hash of it (two
    directories both named "opt" get two files)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(source).rstrip("/").rsplit("/", 1)[-1]).strip("_") or "model"
    tag = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    return Path(directory) / f"{slug}-{tag}-{dtype}-{scheme}.mwoff"


def check_directory(directory: Path) -> None:
    """The directory exists (or is created), takes a file, and has room for one that must be written."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OffloadError(f"offload_dir {directory}: not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OffloadError(f"offload_dir {directory}: cannot be created ({e.strerror})") from None
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise OffloadError(f"offload_dir {directory}: not writable ({e.strerror})") from None


def check_free_space(directory: Path, header: StoreHeader, path: Path) -> None:
    """Room for the file about to be written (a stale file it replaces counts as free)."""
    needed = file_size(header)
    free = shutil.disk_usage(directory).free + (path.stat().st_size if path.exists() else 0)
    if free < needed:
        raise OffloadError(f"offload_dir {directory}: {format_size(free)} free, the offload file of "
                           f"{header.model_id} needs {format_size(needed)}")
