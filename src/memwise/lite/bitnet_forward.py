"""BitNet b1.58 over many tokens (prefill) with numpy and the kernel library's multi-row BitLinear.

Why not the fused decode step, token by token: each step streams every weight once for one token, so
a prompt of n tokens costs n passes over the weights. Here a slice of the prompt goes through the
model layer by layer: each ternary matrix multiplies all the slice's rows at once
(memwise.kernels._ternary.bitlinear, the C function the torch path's prefill calls), so its codes
are read once per block of rows. Each matrix of a stacked group (q/k/v, gate/up) is its own call with
its own scale: the int8 product and its rescale m / s are the decode step's, for the same input.

The float work between the products is the model's math (memwise/models/bitnet/modules.py) in
numpy: rotary embedding (the angle pos * inv_freq in float32, its cosine in double, as the C step
takes it), the new keys and values written into the KV cache in the layout the fused step reads
([kv_heads, max_length, head_dim] per layer, slot = position), the GLU. Causal attention of the
slice's queries over every slot so far is the C extension's (memwise.models.bitnet._step.attend:
the decode step's attention per head and query, threads over those pairs), not numpy's matmul:
that goes to OpenBLAS, whose thread pool contends with the C products' OpenMP threads; on the
2-core VM, busy with other jobs, a [128, 96] x [96, 128] product took 13 ms that way, 0.04 ms on
one BLAS thread. The result agrees with the fused step and the torch path to rounding.

A long prompt goes in slices (SLICE_BYTES of GLU activations each): a slice attends over the cache
the slices before it wrote, so the slice bounds the temporaries, not the prompt.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from memwise.kernels import _ternary
from memwise.kernels.packed_layout import BLOCK_BYTES
from memwise.lite.bitnet_weights import BitNetWeights, Projection
from memwise.models.bitnet import step_structs

# Rows per slice keep the widest activation (gate and up, 2 x intermediate floats per row) under
# this many bytes, as hgrn_forward's slices do.
SLICE_BYTES = 8 << 20


class BitNetForward:
    """The many-token forward of one BitNet model, on one instruction-set path, `threads` per product."""

    def __init__(self, weights: BitNetWeights, isa_id: int):
        self.w = weights
        self.spec = weights.spec
        self.isa_id = isa_id
        self.eps = weights.spec.norm_eps
        self.threads = 1

    def bitlinear(self, x: np.ndarray, p: Projection) -> list[np.ndarray]:
        """Each stacked matrix of p on rmsnorm(x) * gain (int8 per row, exact product, m / s):
        x [M, K] float32 -> one float32 [M, rows] per matrix."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        nb = p.codes.shape[1] // BLOCK_BYTES
        outputs, at = [], p.codes.ctypes.data
        for rows, scale in zip(p.rows, p.scales):
            out = np.empty((x.shape[0], rows), dtype=np.float32)
            if x.shape[0]:
                _ternary.bitlinear(self.isa_id, at, rows, nb, scale, x.ctypes.data, x.shape[0], p.cols,
                                   p.gain.ctypes.data, self.eps, out.ctypes.data, self.threads)
            outputs.append(out)
            at += rows * p.codes.shape[1]
        return outputs

    def hidden(self, ids: np.ndarray, cache: Any) -> np.ndarray:
        """The last layer's output [T, H] for token ids [T] at positions cache.length onwards; their keys
        and values go into the cache, whose length advances by T."""
        start, length = cache.length, ids.shape[0]
        cos, sin = self.rotary(start, length)
        x = self.w.embed(ids).astype(np.float32, copy=False)
        for n, layer in enumerate(self.w.projections):
            x = self.block(n, layer, x, cache, start, cos, sin)
        cache.length = start + length
        return x

    def rotary(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [T, 1, head_dim / 2] of positions start..start + T - 1."""
        positions = np.arange(start, start + length, dtype=np.int64).astype(np.float32)
        angles = (positions[:, None] * self.w.inv_freq[None, :]).astype(np.float64)
        return (np.cos(angles).astype(np.float32)[:, None, :], np.sin(angles).astype(np.float32)[:, None, :])

    def block(self, n: int, layer: list[Projection], x: np.ndarray, cache: Any, start: int,
              cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """One layer: x + o(attention), then + down(GLU(gate, up)), for x [T, H] (changed in place).
        Each half's temporaries are freed when it returns: a slice's peak is the wider half's."""
        qkv, o, gate_up, down = layer
        x += self.self_attention(n, qkv, o, x, cache, start, cos, sin)
        gate, up = self.bitlinear(x, gate_up)
        (out,) = self.bitlinear(glu(gate, up, self.spec.activation == "relu2"), down)
        x += out
        return x

    def self_attention(self, n: int, qkv: Projection, o: Projection, x: np.ndarray, cache: Any, start: int,
                       cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """o(attention(rope(q), rope(k), v)) [T, H] for x [T, H]; the keys and values go into layer n's cache."""
        s = self.spec
        length, end = x.shape[0], start + x.shape[0]
        q, k, v = self.bitlinear(x, qkv)
        k = rope(k.reshape(length, s.num_kv_heads, s.head_dim), cos, sin)
        cache.keys[n][:, start:end] = k.transpose(1, 0, 2)
        cache.values[n][:, start:end] = v.reshape(length, s.num_kv_heads, s.head_dim).transpose(1, 0, 2)
        del k, v
        q = rope(q.reshape(length, s.num_heads, s.head_dim), cos, sin)
        (out,) = self.bitlinear(self.attention(q, cache.keys[n], cache.values[n], start), o)
        return out

    def attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
        """softmax(q k^T / sqrt(d)) v with a causal mask, for queries q [T, heads, d] at positions start..
        against a layer's cache keys, values [kv_heads, max_length, d] (slots 0..start + T - 1 written):
        [T, heads * d]. The decode step's C attention per (head, query), the same float order."""
        length, heads, d = q.shape
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = np.empty((length, heads * d), dtype=np.float32)
        step_structs._step.attend(self.isa_id, q.ctypes.data, length, heads, keys.shape[0], d, keys.ctypes.data,
                                  values.ctypes.data, keys.shape[1], start, out.ctypes.data, self.threads)
        return out

    def slice_rows(self) -> int:
        """Prompt tokens per slice (SLICE_BYTES)."""
        return max(1, SLICE_BYTES // (8 * self.spec.intermediate_size))


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rotate_half rotary embedding of x [T, heads, d] with cos, sin [T, 1, d / 2], as a new array."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    out = np.empty_like(x)
    out[..., :half] = first * cos - second * sin
    out[..., half:] = second * cos + first * sin
    return out


def glu(gate: np.ndarray, up: np.ndarray, relu2: bool) -> np.ndarray:
    """act(gate) * up, act relu(x)^2 or silu (x / (1 + exp(-x))), in place (gate and up are overwritten,
    the result is one of them): no temporary as wide as they are."""
    if relu2:
        np.maximum(gate, 0, out=gate)
        np.square(gate, out=gate)
        gate *= up
        return gate
    up *= gate
    with np.errstate(over="ignore"):
        np.negative(gate, out=gate)
        np.exp(gate, out=gate)
    gate += 1
    return np.divide(up, gate, out=up)
