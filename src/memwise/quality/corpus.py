"""The text the reference model learns and is measured on: the Python standard library's top-level
modules, which ship with every Python, read as UTF-8 bytes (token id = byte value).

Files are split by name, sorted: every tenth file is held out for evaluation, the rest are training
text, so the two never share a file.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

HELD_OUT_EVERY = 10


def stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def split() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files)."""
    files = stdlib_files()
    held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [f for f in files if f not in held], held


def token_ids(files: list[Path]) -> list[int]:
    """The files' bytes, one id per byte, files separated by a NUL byte."""
    ids: list[int] = []
    for path in files:
        ids.extend(path.read_bytes())
        ids.append(0)
    return ids
