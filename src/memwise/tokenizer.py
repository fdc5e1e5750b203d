"""Tokenizers: Hugging Face tokenizer.json files, and a byte tokenizer for synthetic-weight presets."""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Callable, Protocol

from memwise.errors import CheckpointError, shown
from memwise.json_file import read_json_object


class TextStream(Protocol):
    """Incremental decoding: `step(token_id)` returns only the text that token adds ("" while it waits)."""

    def step(self, token_id: int) -> str: ...


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def decode_stream(self) -> TextStream: ...


class IncrementalDecoder:
    """Incremental decoding over any `decode(ids) -> str`, linear in the output's length.

    It keeps a short window of ids: the ids of the text already returned that the next token may
    still need as context (a piece's leading space, a character split across byte tokens), and the
    ids since. Each step decodes the window with and without the new ids and returns the difference,
    and holds it back while it ends in U+FFFD (an incomplete multi-byte character). The same scheme
    as `tokenizers.decoders.DecodeStream` and Hugging Face's TextStreamer.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []       # window: context ids, then ids whose text is not yet returned
        self._read = 0                  # _ids[:_read] is the context, already returned
        self._prefix = ""               # decode(_ids[:_read])

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix):]
        # The ids just returned become the context of the next step; older ones are dropped.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix = self._decode(self._ids)
        return new


def decode_stream(tokenizer: "Tokenizer | Callable[[list[int]], str]") -> TextStream:
    """A tokenizer's incremental decoder, given the tokenizer, its bound `decode`, or any decode function."""
    owner = getattr(tokenizer, "__self__", None)        # a bound method tokenizer.decode
    if owner is not None and getattr(tokenizer, "__name__", None) == "decode":
        tokenizer = owner
    make = getattr(tokenizer, "decode_stream", None)
    if make is not None:
        return make()
    decode = getattr(tokenizer, "decode", tokenizer)
    return IncrementalDecoder(decode)


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

    def decode_stream(self) -> TextStream:
        """Incremental decoding through the tokenizer's own decoder pipeline, like `decode`.

        Not `tokenizers.decoders.DecodeStream` (tokenizers >= 0.21), which runs the same scheme but
        raises when a window decodes to text that does not start with what it already returned: a
        byte-fallback decoder (Llama, Mistral) does that on invalid UTF-8, which a model can generate,
        because it turns a whole run of byte tokens into U+FFFD when the run is not valid UTF-8. On
        such output the stream keeps what it has returned and can differ from `decode`; on valid
        text, and with byte-level (GPT-2 style) decoders on any ids, the two agree.
        """
        return IncrementalDecoder(self.decode)


class ByteTokenizer:
    """UTF-8 bytes as token ids. Presets have random weights, so any reversible mapping will do."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def decode_stream(self) -> TextStream:
        """UTF-8 decoded byte by byte; a character split across byte tokens comes out whole."""
        return _ByteDecodeStream()


class SentencePieceTokenizer:
    """A SentencePiece tokenizer.model (Llama/Mistral style: BOS prepended), for repos without tokenizer.json."""

    def __init__(self, path: Path, bos_token_id: int | None):
        try:
            import sentencepiece
        except ImportError:
            raise CheckpointError(f"{path}: reading tokenizer.model needs the sentencepiece package "
                                  "(pip install sentencepiece)") from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # OSError or RuntimeError, by version, for an unreadable or malformed file
            raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
        self.bos_token_id = bos_token_id

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        return ids if self.bos_token_id is None else [self.bos_token_id, *ids]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if i != self.bos_token_id])

    def decode_stream(self) -> TextStream:
        return IncrementalDecoder(self.decode)


class _ByteDecodeStream:
    """ByteTokenizer's incremental decoder: ids outside 0-255 add nothing, as in `decode`."""

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        token_id = int(token_id)
        return self._utf8.decode(bytes((token_id,))) if 0 <= token_id < 256 else ""


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
    config = read_json_object(path, CheckpointError)
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{path}: field 'added_tokens_decoder' should be an object, found {shown(decoder)}")
    by_content = {}
    for key, token in decoder.items():
        if not key.isdigit() or not isinstance(token, dict):
            raise CheckpointError(f"{path}: added_tokens_decoder entry {shown(key)} should map a token id "
                                  f"to an object, found {shown(token)}")
        by_content[token.get("content")] = int(key)
    found = {}
    for role in ("pad_token", "eos_token", "bos_token"):
        token = config.get(role)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token in by_content:
            found[role] = by_content[token]
    return found
