"""memwise.load and LanguageModel: the public face of a loaded model."""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from memwise.checkpoint import CheckpointReader
from memwise.dtypes import parse_dtype
from memwise.errors import MemwiseError, UnsupportedError, shown
from memwise.kernels import kv_quant
from memwise.generate import GenerationOptions, generate_steps
from memwise.memory_gate import check_fits, weights_bytes
from memwise.quantization import check_kv_scheme, check_scheme
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
         revision: str | None = None, seed: int = 0, quantize: str | None = None, kv_cache: str | None = None,
         max_memory: str | int | None = None, offload_dir: str | Path | None = None) -> "LanguageModel":
    """Load a model from a local Hugging Face directory, a hub id, or "preset:NAME" (synthetic weights).

    quantize="int8" stores the decoder layers' linear weights in int8 (memwise.quantization); `dtype`
    is then the dtype of everything else. kv_cache="int8" | "int4" stores the KV cache of every
    generation and logits call quantized (memwise.kernels.kv_quant). max_memory="2GiB" with
    offload_dir=DIR keeps the weights that do not fit in DIR and streams them in layer by layer
    (docs/offload.md)."""
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    if check_scheme(quantize) and torch_device.type != "cpu":
        raise UnsupportedError(f"quantize={quantize!r} runs on the CPU for now (device {device!r} requested)")
    resolved = resolve_model(source, revision)
    spec, family, directory = resolved.spec, resolved.family, resolved.directory
    quantize = check_scheme(quantize, spec.model_type)
    kv_cache = check_kv_scheme(kv_cache, spec.model_type)
    if kv_cache is not None:
        kv_quant.bytes_per_vector(kv_cache, spec.head_dim)    # refuses a head_dim the layout cannot hold
    reader, stored = None, None
    if directory is not None:
        reader = CheckpointReader(directory)
        reader.check_layer_count(spec.num_layers, resolved.where)
        stored = _stored_scheme(source, resolved, reader, quantize, torch_device)
        quantize = stored or quantize
    # hgrn_bit's loaders take no quantize argument: pass it only when there is one
    options = {"quantize": quantize} if quantize else {}
    if max_memory is not None or offload_dir is not None:
        from memwise.offload.load import load_offloaded_model
        module = load_offloaded_model(resolved, reader, torch_dtype, torch_device, quantize, seed, max_memory, offload_dir)
        module.kv_cache = kv_cache
        return _language_model(resolved, spec, module, torch_dtype, torch_device)
    check_fits(f"loading {source} as {str(torch_dtype).removeprefix('torch.')}" + (f" ({quantize})" if quantize else ""),
               {"weights": weights_bytes(family, spec, torch_dtype, quantize)}, torch_device)
    if reader is None:
        module = family.synthetic(spec, torch_dtype, torch_device, seed, **options)
        module.kv_cache = kv_cache
        return LanguageModel(spec, module, ByteTokenizer(spec.vocab_size), torch_dtype, torch_device)
    spec = _with_special_tokens(spec, directory)
    if stored is not None:
        module = family.load_quantized(spec, reader, torch_dtype, torch_device, stored)
    else:
        module = family.load(spec, reader, torch_dtype, torch_device, **options)
    module.kv_cache = kv_cache
    return LanguageModel(spec, module, load_tokenizer(directory, spec.bos_token_id), torch_dtype, torch_device)


def load_tokenizer_of(source: str | Path, revision: str | None = None) -> Tokenizer:
    """The tokenizer `load(source)` would give its model, without reading any weights."""
    resolved = resolve_model(source, revision)
    if resolved.directory is None:
        return ByteTokenizer(resolved.spec.vocab_size)
    return load_tokenizer(resolved.directory, resolved.spec.bos_token_id)


def _stored_scheme(source: str | Path, resolved, reader: CheckpointReader, quantize: str | None,
                   device: torch.device) -> str | None:
    """The scheme a `memwise convert --quantize` checkpoint was written in (None for a float one)."""
    family = resolved.family
    stored = family.stored_scheme(resolved.config, reader, resolved.where) if hasattr(family, "stored_scheme") else None
    if stored is not None and quantize not in (None, stored):
        raise UnsupportedError(f"{source}: a checkpoint quantized as {stored} cannot load as quantize={quantize!r}")
    if stored is not None and device.type != "cpu":
        raise UnsupportedError(f"{source}: a checkpoint quantized as {stored} runs on the CPU for now "
                               f"(device {str(device)!r} requested)")
    return stored


def _with_special_tokens(spec: ModelSpec, directory: Path) -> ModelSpec:
    specials = special_token_ids(directory)
    return dataclasses.replace(
        spec,
        pad_token_id=spec.pad_token_id if spec.pad_token_id is not None else specials.get("pad_token"),
        eos_token_ids=spec.eos_token_ids or ((specials["eos_token"],) if "eos_token" in specials else ()))


def _language_model(resolved, spec: ModelSpec, module: torch.nn.Module, dtype: torch.dtype,
                    device: torch.device) -> "LanguageModel":
    if resolved.directory is None:
        return LanguageModel(spec, module, ByteTokenizer(spec.vocab_size), dtype, device)
    spec = _with_special_tokens(spec, resolved.directory)
    module.spec = spec
    return LanguageModel(spec, module, load_tokenizer(resolved.directory, spec.bos_token_id), dtype, device)


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
    def kv_cache(self) -> str | None:
        """The KV cache scheme chosen at load (None: the model's dtype)."""
        return getattr(self.module, "kv_cache", None)

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
        encoded = [self.tokenizer.encode(p) for p in _prompt_list(prompts)]
        if any(not ids for ids in encoded):
            raise MemwiseError("a prompt encodes to no tokens; give at least one character")
        return left_pad(encoded, self.pad_token_id)

    @property
    def pad_token_id(self) -> int:
        """The id that fills left padding and finished rows: the config's pad or first EOS id when it is
        inside the vocabulary (configs may name ids outside it), else 0; padding is masked, so any id serves."""
        for candidate in (self.spec.pad_token_id, *self.spec.eos_token_ids[:1]):
            if candidate is not None and 0 <= candidate < self.spec.vocab_size:
                return candidate
        return 0

    def _inputs(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(input_ids, (torch.Tensor, np.ndarray)):
            input_ids = _id_tensor(input_ids)
        else:
            rows = _id_rows(input_ids)
            lengths = sorted({len(r) for r in rows})
            if attention_mask is not None and len(lengths) > 1:
                # The mask cannot say where rows of different lengths sit once they are padded.
                raise MemwiseError(f"input_ids rows have different lengths {lengths} and an attention_mask was "
                                   "given; leave attention_mask out to have the rows left-padded, or pass a "
                                   "left-padded tensor with its mask")
            input_ids, mask = left_pad(rows, self.pad_token_id)
            attention_mask = mask if attention_mask is None else attention_mask
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.spec.vocab_size:
            raise MemwiseError(f"input_ids: token id {hi if hi >= self.spec.vocab_size else lo} is outside the "
                               f"vocabulary [0, {self.spec.vocab_size})")
        attention_mask = _mask_tensor(attention_mask, input_ids).to(device=self.device)
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

    def _warn_past_context(self, length: int) -> None:
        # Rotary positions have no table to run off, so a longer context runs; but the model never saw
        # such positions in training and its output usually degrades there. Dynamic NTK scaling is
        # made to stretch past the limit, so it gets no warning.
        scaling = self.spec.rope_scaling or {}
        if (self.spec.positions == "rotary" and length > self.spec.max_positions
                and scaling.get("rope_type") != "dynamic"):
            warnings.warn(f"{length} tokens (prompt + new tokens): the context length exceeds this "
                          f"{self.spec.model_type} model's training context of {self.spec.max_positions} "
                          "positions; expect degraded output past it", UserWarning, stacklevel=3)

    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """One full forward pass without a reused cache: float32 logits [B, T, V]."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        self._check_length(input_ids.shape[1])
        batch, length = input_ids.shape
        check_fits(f"logits of {batch} x {length} tokens",
                   {"cache": self.module.cache_bytes(batch, length),
                    "logits": batch * length * self.spec.vocab_size * 4}, self.device)
        self._warn_past_context(length)
        with torch.inference_mode():
            cache = self.module.new_cache(batch, length)
            return self.module(input_ids, cache, attention_mask).float()

    def stream(self, input_ids, max_new_tokens: int = 32, attention_mask=None, **options) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens ([B] long) as they are produced."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        opts = GenerationOptions(max_new_tokens=max_new_tokens, **_normalize(options))
        opts.check()    # here, not on the first step of the lazy generator, and before the length sum
        self._check_length(input_ids.shape[1] + opts.max_new_tokens)
        decode = self._tokenizer.decode if self._tokenizer is not None else None
        steps = generate_steps(self.module, input_ids, attention_mask, opts, self.spec.eos_token_ids,
                               self.pad_token_id, decode)
        self._warn_past_context(input_ids.shape[1] + opts.max_new_tokens)   # once the request passed its checks
        return steps

    def generate(self, input_ids, max_new_tokens: int = 32, attention_mask=None, **options) -> torch.Tensor:
        """Prompt plus generated tokens, [B, T + n] like Hugging Face's generate (n <= max_new_tokens)."""
        input_ids_t, mask = self._inputs(input_ids, attention_mask)
        steps = list(self.stream(input_ids_t, max_new_tokens, mask, **options))
        return torch.cat([input_ids_t, torch.stack(steps, dim=1)], dim=1) if steps else input_ids_t

    def generate_text(self, prompt: str, max_new_tokens: int = 32, **options) -> str:
        if not isinstance(prompt, str):
            raise MemwiseError(f"prompt must be a str, got {_shown(prompt)}; for several prompts use "
                               "encode_batch and generate")
        ids, mask = self.encode_batch([prompt])
        out = self.generate(ids, max_new_tokens, mask, **options)
        return self.tokenizer.decode(out[0, ids.shape[1]:].tolist())

    def __repr__(self) -> str:
        kind = "synthetic" if self.synthetic else "real"
        kv = self.kv_cache
        return (f"LanguageModel({self.spec.model_type}, source={self.spec.source!r}, {kind} weights, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, device={self.device}"
                + (f", kv_cache={kv}" if kv else "") + ")")


def _normalize(options: dict) -> dict:
    known = {f.name for f in dataclasses.fields(GenerationOptions)} - {"max_new_tokens"}
    unknown = set(options) - known
    if unknown:
        raise MemwiseError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    return options     # values are checked by GenerationOptions.check


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


# ---- what the API accepts as prompts, token ids and masks ---------------------------------------

_IDS = "int token ids: a list of ints, a list of such lists, or a 1-D/2-D integer tensor or numpy array"


def _shown(value: object) -> str:
    return f"{shown(value)} ({type(value).__name__})"


def _prompt_list(prompts: object) -> list[str]:
    if isinstance(prompts, str):
        raise MemwiseError(f"prompts must be a list of str, got one str {_shown(prompts)}; pass [text]")
    if not isinstance(prompts, Sequence) or not prompts:
        raise MemwiseError(f"prompts must be a non-empty list of str, got {_shown(prompts)}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise MemwiseError(f"prompts[{i}] must be a str, got {_shown(prompt)}")
    return list(prompts)


def _id_tensor(ids: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[batch, tokens] long ids from a tensor or array; floats and bools are refused, not truncated."""
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise MemwiseError(f"input_ids must be {_IDS}; got a numpy array of {ids.dtype}")
        ids = torch.from_numpy(ids.astype(np.int64))
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise MemwiseError(f"input_ids must be {_IDS}; got a tensor of {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or 0 in ids.shape:
        raise MemwiseError(f"input_ids must be [batch, tokens] with batch >= 1 and tokens >= 1, "
                           f"got shape {tuple(ids.shape)}")
    return ids.long()


def _id_rows(ids: object) -> list[list[int]]:
    """Rows of ids from Python lists (one flat list is one row); each row must hold ints only."""
    if isinstance(ids, (str, bytes)):
        raise MemwiseError(f"input_ids must be {_IDS}; got {_shown(ids)}: encode text with "
                           "encode_batch([text]) or use generate_text")
    if not isinstance(ids, Sequence) or len(ids) == 0:
        raise MemwiseError(f"input_ids must be {_IDS}; got {_shown(ids)}")
    nested = isinstance(ids[0], (Sequence, torch.Tensor, np.ndarray)) and not isinstance(ids[0], (str, bytes))
    rows = list(ids) if nested else [ids]
    out = []
    for i, row in enumerate(rows):
        where = f"input_ids[{i}]" if nested else "input_ids"
        if isinstance(row, (torch.Tensor, np.ndarray)):
            if row.ndim != 1:
                raise MemwiseError(f"{where} must be a 1-D row of token ids, got shape {tuple(row.shape)}")
            row = _id_tensor(row)[0].tolist() if len(row) else []
        elif isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise MemwiseError(f"{where} must be a list of int token ids, got {_shown(row)}")
        if len(row) == 0:
            raise MemwiseError(f"{where} is empty; every prompt needs at least one token")
        for j, token in enumerate(row):
            # bool is an int subclass, and int() would silently truncate 2.5 to 2.
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise MemwiseError(f"{where}[{j}] must be an int token id, got {_shown(token)}")
        out.append([int(t) for t in row])
    return out


def _mask_tensor(mask: object, ids: torch.Tensor) -> torch.Tensor:
    """The attention mask as a bool tensor of 0/1 entries (all ones when None)."""
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if isinstance(mask, (list, tuple, np.ndarray)):
        try:
            mask = torch.as_tensor(np.asarray(mask))
        except (TypeError, ValueError, RuntimeError):
            raise MemwiseError(f"attention_mask must be a rectangular array of 0/1, got {_shown(mask)}") from None
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
        kind = f"a tensor of {mask.dtype}" if isinstance(mask, torch.Tensor) else _shown(mask)
        raise MemwiseError(f"attention_mask must be 0/1 ints or bools, got {kind}")
    if mask.dtype != torch.bool and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise MemwiseError("attention_mask must hold only 0 and 1")
    return (mask[None] if mask.dim() == 1 else mask).to(dtype=torch.bool)
