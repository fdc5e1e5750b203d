"""Reading a JSON file a user gave or a run wrote (config.json, an index, tokenizer_config.json,
results.json), with errors that name it: unreadable, not UTF-8, or malformed all end in one line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memwise.errors import MemwiseError


def read_json(path: Path, error: type[MemwiseError] = MemwiseError) -> Any:
    """The parsed contents of `path`; any failure raises `error` naming the file (and line and column)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        return json.loads(text)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{path}: malformed JSON (nested too deeply)") from None


def read_json_object(path: Path, error: type[MemwiseError] = MemwiseError) -> dict[str, Any]:
    """read_json of a file that must hold a JSON object."""
    value = read_json(path, error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
