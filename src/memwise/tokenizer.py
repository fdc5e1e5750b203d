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


class SentencePieceTokenizer:
    """A SentencePiece tokenizer.model (Llama/Mistral style: BOS prepended), for repos without tokenizer.json."""

    def __init__(self, path: Path, bos_token_id: int | None):
        try:
            import sentencepiece
        except ImportError:
            raise CheckpointError(f"{path}: reading tokenizer.model needs the sentencepiece package "
                                  "(pip install sentencepiece)") from None
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_token_id = bos_token_id

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        return ids if self.bos_token_id is None else [self.bos_token_id, *ids]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if i != self.bos_token_id])


def load_tokenizer(directory: Path, bos_token_id: int | None = None) -> Tokenizer | None:
    """The directory's tokenizer.json (or tokenizer.model), or None: generation from token ids still works."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory / "tokenizer.json")
    if (directory / "tokenizer.model").is_file():
        return SentencePieceTokenizer(directory / "tokenizer.model", bos_token_id)
    return None


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
