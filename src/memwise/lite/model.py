"""LiteModel: a packed ternary checkpoint (HGRN-Bit here; BitNet in bitnet_model.py) loaded and run with numpy and memwise's C extensions, no torch."""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, Iterator

import numpy as np

from memwise import kernels
from memwise.errors import MemwiseError
from memwise.kernels.threads import CpuBudget
from memwise.kernels.workspaces import RecentWorkspaces
from memwise.lite.hgrn_forward import Forward
from memwise.lite.hgrn_weights import HGRNWeights
from memwise.lite.sampling import Sampling, TokenChooser
from memwise.models.hgrn_bit import step_structs
from memwise.models.hgrn_bit.config import recurrence_width
from memwise.spec import ModelSpec
from memwise.tokenizer import Tokenizer

def as_ids(input_ids: Any) -> np.ndarray:
    """Token ids as int64 [B, T]: from a list of ints, a list of equal-length lists, or an array."""
    try:
        ids = np.asarray(input_ids)
    except ValueError:
        raise MemwiseError("input_ids: rows of different lengths; memwise.lite takes prompts of equal length "
                           "(memwise.load pads them)") from None
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0 or not (ids.dtype.kind in "iu" or ids.size == 0):
        raise MemwiseError(f"input_ids must be integer token ids [batch, tokens] with tokens >= 1, got "
                           f"{ids.dtype} {list(ids.shape)}")
    return ids.astype(np.int64)


class LiteModel:
    """A MatMul-free model on numpy and the C kernels: `logits`, `generate`, `stream`, `generate_text`,
    the same calls as memwise.LanguageModel, on numpy arrays of token ids. Steps of concurrent
    generations take turns (a lock: the step's workspace is shared)."""

    def __init__(self, spec: ModelSpec, weights: HGRNWeights, tokenizer: Tokenizer | None, threads: int | None):
        self.spec = spec
        self.weights = weights
        self._tokenizer = tokenizer
        self.threads = threads or len(os.sched_getaffinity(0))
        self.isa = kernels.resolve_isa(None)
        self._forward = Forward(weights, kernels.isa_id(self.isa))
        self._budget = CpuBudget()
        self._workspaces = RecentWorkspaces()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise MemwiseError(f"{self.spec.source or 'this model'}: no tokenizer.json, so text cannot be encoded; "
                               "pass token ids")
        return self._tokenizer

    def new_state(self, batch: int, max_length: int = 0) -> Any:
        """The recurrent state of `batch` sequences: float32 [layers, batch, width], zero (a recurrence
        needs no room per token, so max_length is not used)."""
        return np.zeros((self.spec.num_layers, batch, recurrence_width(self.spec)), dtype=np.float32)

    def logits(self, input_ids: Any) -> np.ndarray:
        """float32 logits [B, T, V] of token ids [B, T], from a fresh state."""
        ids = as_ids(input_ids)
        return self._prefill(ids, self.new_state(ids.shape[0]), last_only=False)

    def _prefill(self, ids: np.ndarray, state: np.ndarray, last_only: bool) -> np.ndarray:
        if ids.shape[1] == 1:   # one token: the fused step, as the torch path does
            return self.step(ids[:, 0], state)[:, None, :]
        self._forward.threads = self._budget.threads(self.threads)
        return self._forward.logits(ids, state, last_only)

    def step(self, tokens: np.ndarray, state: np.ndarray) -> np.ndarray:
        """float32 logits [B, V] of one token per sequence (tokens [B]); advances state in place. One
        C call for every layer and the lm_head (memwise/models/hgrn_bit/csrc/hgrn_step.h)."""
        batch = tokens.shape[0]
        x = np.ascontiguousarray(self.weights.embed(tokens), dtype=np.float32)
        logits = np.empty((batch, self.spec.vocab_size), dtype=np.float32)
        want = (self.spec.num_layers, batch, recurrence_width(self.spec))
        if state.dtype != np.float32 or not state.flags.c_contiguous or state.shape != want:
            raise MemwiseError(f"state must be float32 C-contiguous {list(want)}, got {state.dtype} {list(state.shape)}")
        threads = self._budget.threads(self.threads)
        with self._lock:
            h, d, i, _ = self.weights.sizes
            ws = self._workspaces.get((batch, threads), lambda: step_structs._step.workspace(
                kernels.isa_id(self.isa), batch, h, d, i, threads))
            step_structs._step.step(ws, ctypes.addressof(self.weights.view), x.ctypes.data, state.ctypes.data, 0,
                                    logits.ctypes.data)
        return logits

    def stream(self, input_ids: Any, max_new_tokens: int = 32, *, ignore_eos: bool = False, min_new_tokens: int = 0,
               do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[np.ndarray]:
        """Each step's new tokens, int64 [B], as they come. Greedy unless do_sample; a sequence that
        produced an end-of-sequence token gets the pad token after it, and the stream ends when all have."""
        ids = as_ids(input_ids)
        if max_new_tokens < 0:
            raise MemwiseError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        choose = TokenChooser(Sampling(do_sample, temperature, top_k, top_p, seed))
        eos = np.array(self.spec.eos_token_ids or (), dtype=np.int64)
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else int(eos[0]) if eos.size else 0
        done = np.zeros(ids.shape[0], dtype=bool)
        state = self.new_state(ids.shape[0], ids.shape[1] + max_new_tokens)
        logits = self._prefill(ids, state, last_only=True)[:, -1]
        for n in range(max_new_tokens):
            tokens = np.where(done, pad, choose(logits))
            yield tokens
            if not ignore_eos and n + 1 >= min_new_tokens and eos.size:
                done |= np.isin(tokens, eos)
                if done.all():
                    return
            if n + 1 < max_new_tokens:
                logits = self.step(tokens, state)

    def generate(self, input_ids: Any, max_new_tokens: int = 32, **options: Any) -> np.ndarray:
        """Prompt then new tokens, int64 [B, T + n] (n <= max_new_tokens: fewer when every sequence ended)."""
        ids = as_ids(input_ids)
        steps = list(self.stream(ids, max_new_tokens, **options))
        return np.concatenate([ids, np.stack(steps, axis=1)], axis=1) if steps else ids

    def generate_text(self, prompt: str, max_new_tokens: int = 32, **options: Any) -> str:
        """The text that follows `prompt`."""
        ids = self.tokenizer.encode(prompt)
        out = self.generate([ids], max_new_tokens, **options)
        return self.tokenizer.decode(out[0, len(ids):].tolist())

    def weights_bytes(self) -> int:
        return self.weights.weights_bytes()

    def close(self) -> None:
        """Close the checkpoint file (the embedding rows are read from it): the model is done."""
        self.weights.file.close()

    def decode_bytes_per_token(self) -> int:
        return self.weights.decode_bytes_per_token()
