"""Tokenizers: Hugging Face tokenizer.json files, and a byte tokenizer for synthetic-weight presets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from memwise.errors import CheckpointError


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A tokenizer.json (Hugging Face `tokenizers`), with the special tokens its template adds (e.g. BOS)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class ByteTokenizer:
    """UTF-8 bytes as token ids. Presets have random weights, so any reversible mapping will do."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_tokenizer(directory: Path) -> Tokenizer | None:
    """The directory's tokenizer.json, or None when it has none (generation from token ids still works)."""
    path = Path(directory) / "tokenizer.json"
    return HFTokenizer(path) if path.is_file() else None


def special_token_ids(directory: Path) -> dict[str, int]:
    """pad/eos ids named in tokenizer_config.json's added tokens, where config.json lacks them."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    decoder = config.get("added_tokens_decoder") or {}
    by_content = {v.get("content"): int(k) for k, v in decoder.items() if isinstance(v, dict)}
    found = {}
    for role in ("pad_token", "eos_token", "bos_token"):
        token = config.get(role)
        token = token.get("content") if isinstance(token, dict) else token
        if token in by_content:
            found[role] = by_content[token]
    return found
