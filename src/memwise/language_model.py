"""memwise.load and LanguageModel: the public face of a loaded model."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import torch

from memwise.checkpoint import CheckpointReader
from memwise.dtypes import parse_dtype
from memwise.errors import MemwiseError, UnsupportedError
from memwise.generate import GenerationOptions, generate_steps
from memwise.source import resolve_model
from memwise.spec import ModelSpec
from memwise.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, special_token_ids


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UnsupportedError(f"device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedError(f"device {device!r} requested, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UnsupportedError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UnsupportedError(f"device {device!r} is not supported (use cpu or cuda)")
    return dev


def load(source: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
         revision: str | None = None, seed: int = 0) -> "LanguageModel":
    """Load a model from a local Hugging Face directory, a hub id, or "preset:NAME" (synthetic weights)."""
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    resolved = resolve_model(source, revision)
    spec, family, directory = resolved.spec, resolved.family, resolved.directory
    if directory is None:
        module = family.synthetic(spec, torch_dtype, torch_device, seed)
        return LanguageModel(spec, module, ByteTokenizer(spec.vocab_size), torch_dtype, torch_device)
    specials = special_token_ids(directory)
    spec = dataclasses.replace(
        spec,
        pad_token_id=spec.pad_token_id if spec.pad_token_id is not None else specials.get("pad_token"),
        eos_token_ids=spec.eos_token_ids or ((specials["eos_token"],) if "eos_token" in specials else ()))
    module = family.load(spec, CheckpointReader(directory), torch_dtype, torch_device)
    return LanguageModel(spec, module, load_tokenizer(directory, spec.bos_token_id), torch_dtype, torch_device)


class LanguageModel:
    """A loaded model: its spec, its tokenizer, and logits / generate / stream over token ids."""

    def __init__(self, spec: ModelSpec, module: torch.nn.Module, tokenizer: Tokenizer | None,
                 dtype: torch.dtype, device: torch.device):
        self.spec = spec
        self.module = module.eval()
        self._tokenizer = tokenizer
        self.dtype = dtype
        self.device = device

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise MemwiseError(f"{self.spec.source}: no tokenizer.json, so text cannot be encoded; "
                               "pass token ids instead")
        return self._tokenizer

    @property
    def synthetic(self) -> bool:
        return self.spec.synthetic

    def weights_bytes(self) -> int:
        return self.module.weights_bytes()

    def decode_bytes_per_token(self) -> int:
        """Bytes of weights read to decode one step (the decode speed ceiling is bandwidth / this)."""
        return int(self.module.decode_bytes_per_token())

    def encode_batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] left-padded to the longest prompt, and the mask of real tokens."""
        encoded = [self.tokenizer.encode(p) for p in prompts]
        if any(not ids for ids in encoded):
            raise MemwiseError("a prompt encodes to no tokens; give at least one character")
        return left_pad(encoded, self.pad_token_id)

    @property
    def pad_token_id(self) -> int:
        if self.spec.pad_token_id is not None:
            return self.spec.pad_token_id
        return self.spec.eos_token_ids[0] if self.spec.eos_token_ids else 0

    def _inputs(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor):
            rows = [list(input_ids)] if input_ids and isinstance(next(iter(input_ids)), int) else input_ids
            input_ids, mask = left_pad([list(r) for r in rows], self.pad_token_id)
            attention_mask = mask if attention_mask is None else attention_mask
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise MemwiseError(f"input_ids must be [batch, tokens] with tokens >= 1, got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise MemwiseError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.spec.vocab_size:
            raise MemwiseError(f"token id {hi if hi >= self.spec.vocab_size else lo} is outside the "
                               f"vocabulary [0, {self.spec.vocab_size})")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.to(device=self.device, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise MemwiseError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                               f"{tuple(input_ids.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise MemwiseError("padding must be on the left: the last position of every row must be a real token")
        return input_ids.to(device=self.device, dtype=torch.long), attention_mask

    def _check_length(self, length: int) -> None:
        if self.spec.positions == "learned" and length > self.spec.max_positions:
            raise MemwiseError(f"{length} tokens exceed this model's {self.spec.max_positions} positions "
                               "(prompt + new tokens)")

    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """One full forward pass without a reused cache: float32 logits [B, T, V]."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        self._check_length(input_ids.shape[1])
        with torch.inference_mode():
            cache = self.module.new_cache(input_ids.shape[0], input_ids.shape[1])
            return self.module(input_ids, cache, attention_mask).float()

    def stream(self, input_ids, max_new_tokens: int = 32, attention_mask=None, **options) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens ([B] long) as they are produced."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        opts = GenerationOptions(max_new_tokens=max_new_tokens, **_normalize(options))
        self._check_length(input_ids.shape[1] + opts.max_new_tokens)
        decode = self._tokenizer.decode if self._tokenizer is not None else None
        return generate_steps(self.module, input_ids, attention_mask, opts, self.spec.eos_token_ids,
                              self.pad_token_id, decode)

    def generate(self, input_ids, max_new_tokens: int = 32, attention_mask=None, **options) -> torch.Tensor:
        """Prompt plus generated tokens, [B, T + n] like Hugging Face's generate (n <= max_new_tokens)."""
        input_ids_t, mask = self._inputs(input_ids, attention_mask)
        steps = list(self.stream(input_ids_t, max_new_tokens, mask, **options))
        return torch.cat([input_ids_t, torch.stack(steps, dim=1)], dim=1) if steps else input_ids_t

    def generate_text(self, prompt: str, max_new_tokens: int = 32, **options) -> str:
        ids, mask = self.encode_batch([prompt])
        out = self.generate(ids, max_new_tokens, mask, **options)
        return self.tokenizer.decode(out[0, ids.shape[1]:].tolist())

    def __repr__(self) -> str:
        kind = "synthetic" if self.synthetic else "real"
        return (f"LanguageModel({self.spec.model_type}, source={self.spec.source!r}, {kind} weights, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, device={self.device})")


def _normalize(options: dict) -> dict:
    known = {f.name for f in dataclasses.fields(GenerationOptions)} - {"max_new_tokens"}
    unknown = set(options) - known
    if unknown:
        raise MemwiseError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    if "stop_strings" in options:
        stops = options["stop_strings"]
        options = {**options, "stop_strings": (stops,) if isinstance(stops, str) else tuple(stops or ())}
    return options


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not rows or any(len(r) == 0 for r in rows):
        raise MemwiseError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    return ids, mask
