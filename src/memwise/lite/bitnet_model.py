"""BitNet b1.58 on memwise.lite: the fused C decode step over numpy buffers and a numpy KV cache.

A prompt of more than one token runs layer by layer over all its tokens (bitnet_forward.py: the
kernel library's multi-row BitLinear, the C attention of many queries, numpy between them), writing
the keys and values the decode step reads afterwards. Each new token goes through the fused step
(memwise/models/bitnet/csrc): one C call for all layers, then the final RMSNorm in numpy and the
lm_head product (the kernel library's bf16 product for a bfloat16 head, as the torch path's decode
steps).

The KV cache is float32 [kv_heads, prompt + new tokens, head_dim] per layer, as the torch path's
DecoderCache for one sequence, allocated zeroed (pages the kernel maps on first write, so a cache
costs memory as it fills). One sequence at a time: the fused step runs batch 1.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memwise import kernels
from memwise.errors import MemwiseError
from memwise.heap import release_free_heap
from memwise.lite.bitnet_forward import BitNetForward
from memwise.lite.bitnet_weights import BitNetWeights
from memwise.lite.model import LiteModel, as_ids
from memwise.models.bitnet import step_structs
from memwise.spec import ModelSpec
from memwise.tokenizer import Tokenizer

try:
    from memwise.kernels import _bf16
except ImportError:  # no compiler: the lite loader refuses before a model is built
    _bf16 = None


@dataclass
class KVCache:
    """One sequence's keys and values, float32 [layers][kv_heads, max_length, head_dim]; `length` slots used."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    max_length: int
    length: int = 0
    id: int = field(default=0)


class BitNetLiteModel(LiteModel):
    """BitNet b1.58 on numpy and the C kernels, with LiteModel's calls (logits, stream, generate,
    generate_text) for one sequence at a time."""

    def __init__(self, spec: ModelSpec, weights: BitNetWeights, tokenizer: Tokenizer | None, threads: int | None):
        super().__init__(spec, weights, tokenizer, threads)
        # The id of the cache the layer views point into. No reference is kept: holding the last
        # generation's cache would keep a second cache resident while the next one fills; a view
        # into a freed cache is never used, since every step re-points the views at its own cache.
        self._pointed_at: int | None = None
        self._caches = 0
        self._forward = BitNetForward(weights, kernels.isa_id(self.isa))

    def new_state(self, batch: int, max_length: int = 0) -> KVCache:
        """An empty KV cache for one sequence of up to `max_length` tokens."""
        if batch != 1:
            raise MemwiseError(f"memwise.lite runs bitnet one sequence at a time, got a batch of {batch}")
        if not 1 <= max_length <= self.spec.max_positions:
            raise MemwiseError(f"prompt and new tokens must fit the model's {self.spec.max_positions} positions "
                               f"(max_position_embeddings), got {max_length}")
        s = self.spec
        shape = (s.num_kv_heads, max_length, s.head_dim)
        self._caches += 1
        return KVCache([np.zeros(shape, np.float32) for _ in range(s.num_layers)],
                       [np.zeros(shape, np.float32) for _ in range(s.num_layers)], max_length, id=self._caches)

    def logits(self, input_ids: Any) -> np.ndarray:
        """float32 logits [1, T, V] of token ids [1, T], from an empty cache."""
        ids = self._ids(input_ids)
        return self._prefill(ids, self.new_state(1, ids.shape[1]), last_only=False)

    def _ids(self, input_ids: Any) -> np.ndarray:
        ids = as_ids(input_ids)
        if ids.shape[0] != 1:
            raise MemwiseError(f"memwise.lite runs bitnet one sequence at a time, got a batch of {ids.shape[0]}")
        return ids

    def _prefill(self, ids: np.ndarray, state: KVCache, last_only: bool) -> np.ndarray:
        """Logits [1, T or 1, V] of a prompt [1, T]: one token through the fused step, more through
        bitnet_forward's multi-row layers, a slice of the prompt at a time."""
        if ids.shape[1] == 1:
            return self.step(ids[:, 0], state)[:, None, :]
        tokens = ids[0]
        if state.length + tokens.shape[0] > state.max_length:
            raise MemwiseError(f"the KV cache is full: {state.length} + {tokens.shape[0]} prompt tokens do not fit "
                               f"its {state.max_length}")
        self._forward.threads = self._budget.threads(self.threads)
        size = self._forward.slice_rows()
        outputs = []
        for start in range(0, tokens.shape[0], size):
            x = self._forward.hidden(tokens[start:start + size], state)
            if not last_only:
                outputs.append(self.head(x))
            elif start + size >= tokens.shape[0]:
                outputs.append(self.head(x[-1:]))
        # glibc keeps the freed activations (a few MB per layer) in the heap otherwise, resident through
        # the decode steps that follow
        release_free_heap()
        return np.concatenate(outputs)[None] if len(outputs) > 1 else outputs[0][None]

    def _hidden(self, token: int, cache: KVCache) -> np.ndarray:
        """The last layer's output [1, H] for one token at position cache.length (advanced)."""
        if cache.length >= cache.max_length:
            raise MemwiseError(f"the KV cache is full ({cache.max_length} tokens)")
        x = np.ascontiguousarray(self.weights.embed(np.array([token])), dtype=np.float32)
        threads = self._budget.threads(self.threads)
        with self._lock:
            if self._pointed_at != cache.id:
                view = self.weights.view
                for n in range(self.spec.num_layers):
                    view.layers[n].keys = cache.keys[n].ctypes.data
                    view.layers[n].values = cache.values[n].ctypes.data
                view.max_length = cache.max_length
                self._pointed_at = cache.id
            ws = self._workspace(threads, cache.max_length)
            step_structs._step.step(ws, ctypes.addressof(self.weights.view), x.ctypes.data, cache.length)
        cache.length += 1
        return x

    def _workspace(self, threads: int, max_length: int) -> Any:
        s = self.spec
        return self._workspaces.get((threads, max_length), lambda: step_structs._step.workspace(
            kernels.isa_id(self.isa), s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
            s.intermediate_size, s.head_dim, max_length, threads))

    def step(self, tokens: np.ndarray, state: KVCache) -> np.ndarray:
        """float32 logits [1, V] of one token (tokens [1]); its key and value go into the cache."""
        x = self._hidden(int(tokens[0]), state)
        return self.head(x)

    def head(self, x: np.ndarray) -> np.ndarray:
        """lm_head(rmsnorm(x) * gain) for x [M, H] float32 -> [M, V]."""
        w = self.weights
        scale = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(self.spec.norm_eps))
        x = np.ascontiguousarray(x * scale * w.final_norm, dtype=np.float32)
        if w.lm_head_dtype == "F32":
            return x @ w.lm_head.T
        out = np.empty((x.shape[0], self.spec.vocab_size), dtype=np.float32)
        _bf16.linear(kernels.isa_id(self.isa), w.lm_head.ctypes.data, w.lm_head.shape[0], w.lm_head.shape[1],
                     x.ctypes.data, x.shape[0], out.ctypes.data, self._budget.threads(self.threads))
        return out
