"""Reading a JSON file a user gave or a run wrote (config.json, results.json), with errors that name it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memwise.errors import MemwiseError


def read_json(path: Path, error: type[MemwiseError] = MemwiseError) -> Any:
    """The parsed contents of `path`; malformed JSON raises `error` naming the file, line and column."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
