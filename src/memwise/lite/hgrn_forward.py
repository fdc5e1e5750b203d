"""HGRN-Bit over many tokens (prefill) with numpy and the kernel library's multi-row BitLinear.

Why not the fused decode step, token by token: each step streams every weight once for one token, so
a prompt costs as many passes over the weights as it has tokens (about 300 tok/s for mmfree-370m on
the 2-core reference machine). Here each BitLinear multiplies all the prompt's rows at once
(memwise.kernels._ternary.bitlinear, the same C function the torch path calls for prefill), so the
codes are unpacked once per block of rows; numpy does the float work between the products, and the
recurrence runs time-major over [batch, width] slices. The products, their norms and activation
quantization are the C code's and identical to the torch path's; the float work between them is the
model's math (memwise/models/hgrn_bit/modules.py) in numpy's rounding, within the float tolerance
of the torch path.
"""
from __future__ import annotations

import numpy as np

from memwise.kernels import _ternary
from memwise.kernels.packed_layout import BLOCK_BYTES
from memwise.lite.hgrn_weights import HGRNWeights, Layer, Matrix

# Rows per slice keep the widest activation (the gate/up output, 2 x intermediate floats per row)
# under this many bytes, as the torch path's PREFILL_SLICE_BYTES does: reused heap, warm caches.
SLICE_BYTES = 8 << 20


class Forward:
    """The many-token forward of one model, on one instruction-set path with a thread count per call."""

    def __init__(self, weights: HGRNWeights, isa_id: int):
        self.w = weights
        self.isa_id = isa_id
        self.eps = weights.spec.norm_eps
        self.threads = 1

    def bitlinear(self, x: np.ndarray, m: Matrix) -> np.ndarray:
        """rmsnorm(x) * gain -> int8 per row -> ternary product -> rescale: x [M, K] float32 -> [M, N]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], m.rows), dtype=np.float32)
        if x.shape[0]:
            _ternary.bitlinear(self.isa_id, m.codes.ctypes.data, m.rows, m.codes.shape[1] // BLOCK_BYTES, m.scale,
                               x.ctypes.data, x.shape[0], m.cols, m.gain.ctypes.data, self.eps, out.ctypes.data,
                               self.threads)
        return out

    def rmsnorm(self, x: np.ndarray, gain: np.ndarray) -> np.ndarray:
        scale = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(self.eps))
        return x * scale * gain

    def hidden(self, ids: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Hidden states after the last layer, [B, T, H], for token ids [B, T]; advances state [L, B, D]."""
        batch, length = ids.shape
        x = self.w.embed(ids).reshape(batch * length, -1)
        for n, layer in enumerate(self.w.layers):
            x = self.block(layer, x, state[n], batch)
        return x.reshape(batch, length, -1)

    def block(self, layer: Layer, x: np.ndarray, state: np.ndarray, batch: int) -> np.ndarray:
        """One layer: x + MLGRU(norm(x)), then + GLU(norm(.)), for x [B * T, H]; state [B, D] advanced."""
        h = self.rmsnorm(x, layer.attn_norm)
        i, f, g = (self.bitlinear(h, m) for m in (layer.i_proj, layer.f_proj, layer.g_proj))
        f = sigmoid(f)
        if layer.lower_bound is not None:
            f *= 1 - layer.lower_bound
            f += layer.lower_bound
        c = silu(i)
        c *= 1 - f
        states = recurrence(f.reshape(batch, -1, f.shape[-1]), c.reshape(batch, -1, c.shape[-1]), state)
        heads = self.w.spec.num_heads
        g = self.rmsnorm(g.reshape(g.shape[0], heads, -1), layer.g_norm).reshape(g.shape)
        g *= silu(states.reshape(g.shape))
        x = x + self.bitlinear(g, layer.o_proj)
        up = self.bitlinear(self.rmsnorm(x, layer.mlp_norm), layer.gate_proj)
        inner = layer.down_proj.cols
        act = silu(up[:, :inner])
        act *= up[:, inner:]
        x += self.bitlinear(act, layer.down_proj)
        return x

    def logits(self, ids: np.ndarray, state: np.ndarray, last_only: bool) -> np.ndarray:
        """float32 logits [B, T or 1, V] of token ids [B, T]; advances state. Long inputs go in slices
        (SLICE_BYTES): the recurrence carries its state between them, everything else is per token."""
        batch, length = ids.shape
        most = max(1, SLICE_BYTES // (8 * self.w.spec.intermediate_size) // max(batch, 1))
        count = -(-length // most)
        size = -(-length // count) if length else 1
        outputs = []
        for start in range(0, length, size):
            x = self.hidden(ids[:, start:start + size], state)
            if last_only and start + size < length:
                continue
            if last_only:
                x = x[:, -1:]
            head = self.bitlinear(self.rmsnorm(x.reshape(-1, x.shape[-1]), self.w.final_norm), self.w.lm_head)
            outputs.append(head.reshape(batch, x.shape[1], -1))
        if not outputs:
            return np.empty((batch, 0, self.w.spec.vocab_size), dtype=np.float32)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), in place on x (a temporary of the caller's); exp overflow gives 0, as it should."""
    with np.errstate(over="ignore"):
        np.negative(x, out=x)
        np.exp(x, out=x)
    x += 1
    return np.reciprocal(x, out=x)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), as a new array."""
    with np.errstate(over="ignore"):
        e = np.exp(-x)
    e += 1
    return np.divide(x, e, out=e)


def recurrence(f: np.ndarray, c: np.ndarray, state: np.ndarray) -> np.ndarray:
    """state_t = f_t * state_{t-1} + c_t over T for f, c [B, T, D]; state [B, D] advanced in place.

    Returns every state_t as [B, T, D] (c, overwritten). Time-major over contiguous [B, D] slices."""
    ct = np.ascontiguousarray(c.transpose(1, 0, 2))
    ft = np.ascontiguousarray(f.transpose(1, 0, 2))
    tmp = np.empty_like(state)
    previous = state
    for t in range(ct.shape[0]):
        np.multiply(ft[t], previous, out=tmp)
        ct[t] += tmp
        previous = ct[t]
    state[...] = ct[-1]
    return ct.transpose(1, 0, 2)
