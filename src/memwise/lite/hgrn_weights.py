"""An HGRN-Bit model's weights as numpy buffers, read from a packed checkpoint, and the C step's view of them.

The buffers are the ones the torch path builds (memwise.models.hgrn_bit.build), in the same forms:
every ternary matrix's codes in one buffer backed by huge pages, norm gains and lower bounds in
float32. The embedding table stays in the file: each token's row is read when needed (a decode step
uses one row), so the table takes page cache, which the kernel can drop, and no memory of the
process (memwise.lite.packed_file).

`ModelView` (memwise.models.hgrn_bit.step_structs) holds raw pointers into these buffers; the
HGRNWeights object keeps them alive as long as it lives.
"""
from __future__ import annotations

import mmap
import os
import sys
from dataclasses import dataclass

import numpy as np

from memwise.errors import CheckpointError, ConfigError, MemwiseError
from memwise.kernels import MAX_COLS, last_level_cache_bytes
from memwise.kernels.packed_layout import BLOCK, BLOCK_BYTES, padded_cols
from memwise.lite.packed_file import PackedFile, as_float32
from memwise.models.hgrn_bit.config import recurrence_width
from memwise.models.hgrn_bit.layout import checkpoint_layout, packed_bytes
from memwise.models.hgrn_bit.step_structs import BitLinearView, LayerView, ModelView
from memwise.models.ternary.packed_format import PACKED_SUFFIX, SCALE_SUFFIX
from memwise.spec import ModelSpec

HUGE_PAGE = 2 << 20
CHECK_BYTES = 1 << 20       # codes checked at a time, bounding the check's temporaries


@dataclass
class Matrix:
    """One BitLinear: packed codes uint8 [rows, padded_cols(cols) / 4], the gain of its input norm, its scale."""

    codes: np.ndarray
    gain: np.ndarray
    scale: float
    rows: int
    cols: int

    def view(self) -> BitLinearView:
        return BitLinearView(self.codes.ctypes.data, self.gain.ctypes.data, self.scale)


@dataclass
class Layer:
    attn_norm: np.ndarray
    i_proj: Matrix
    f_proj: Matrix
    g_proj: Matrix
    g_norm: np.ndarray
    o_proj: Matrix
    mlp_norm: np.ndarray
    gate_proj: Matrix
    down_proj: Matrix
    lower_bound: np.ndarray | None      # float32 [width]; None for layer 0 and without lower bounds


def codes_buffer(nbytes: int) -> np.ndarray:
    """uint8 [nbytes] for every matrix's codes: anonymous memory advised for (and aligned to) 2 MB
    pages on Linux, as memwise.kernels.packed.codes_buffer does for the torch path, and for the same
    reason (every decode step streams all codes; 4 KB pages cost a page walk each)."""
    if nbytes < HUGE_PAGE or not sys.platform.startswith("linux") or os.environ.get("MEMWISE_HUGE_PAGES", "1") == "0":
        return np.empty(nbytes, dtype=np.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # shared memory gets no THP
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    raw = np.frombuffer(region, dtype=np.uint8)     # keeps the mapping alive
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start:start + nbytes]


def check_codes(codes: np.ndarray, cols: int, name: str, where: str) -> None:
    """Reject code 3 (no ternary value) anywhere and non-zero weights in a row's padding, as the torch
    path's reader does (memwise.models.ternary.packed_format.check_packed_codes)."""
    flat = codes.reshape(-1)
    for start in range(0, flat.size, CHECK_BYTES):
        chunk = flat[start:start + CHECK_BYTES]
        if np.any(chunk & (chunk >> 1) & 0x55):
            raise CheckpointError(f"{where}: tensor '{name}' holds the invalid 2-bit code 3 "
                                  "(codes are t + 1 for t in -1, 0, 1)")
    pad = codes.shape[1] * 4 - cols
    if pad:
        last = codes[:, -BLOCK_BYTES:]
        values = np.stack([(last >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(codes.shape[0], BLOCK)
        if np.any(values[:, BLOCK - pad:] != 1):
            raise CheckpointError(f"{where}: tensor '{name}' has non-zero weights in the padding after column {cols}")


class HGRNWeights:
    """Every tensor of an hgrn_bit model from its packed checkpoint, and the ModelView over them."""

    def __init__(self, spec: ModelSpec, file: PackedFile):
        self.spec = spec
        self.file = file
        where = str(file.path)
        layout = {slot.name: slot for slot in checkpoint_layout(spec)}
        total = sum(packed_bytes(*s.shape) for s in layout.values() if s.ternary)
        self._codes = codes_buffer(total)
        self._at = 0
        h, d, heads = spec.hidden_size, recurrence_width(spec), spec.num_heads
        if d % heads:
            raise ConfigError(f"{where}: num_heads {heads} does not divide the recurrence width {d}")
        self.sizes = (h, d, spec.intermediate_size, spec.vocab_size)
        table = file.entry("model.embeddings.weight", layout["model.embeddings.weight"].shape, ("BF16", "F16", "F32"))
        self.embedding_dtype = table.dtype
        self.embedding_bytes = table.end - table.begin
        lower = self._lower_bounds() if spec.use_lower_bound else None
        self.lower_bounds = lower
        self.layers = [self._layer(n, lower, layout) for n in range(spec.num_layers)]
        self.final_norm = file.float32("model.norm.weight", (h,))
        self.lm_head = self._matrix("lm_head", layout)
        self._layer_views = (LayerView * len(self.layers))(*[self._layer_view(layer) for layer in self.layers])
        self.view = ModelView(num_layers=len(self.layers), hidden=h, width=d, intermediate=spec.intermediate_size,
                              vocab=spec.vocab_size, heads=heads, eps=spec.norm_eps,
                              weights_from_dram=int(self.decode_bytes_per_token() > last_level_cache_bytes()),
                              final_norm=self.final_norm.ctypes.data, lm_head=self.lm_head.view(),
                              layers=self._layer_views)

    def _lower_bounds(self) -> np.ndarray:
        """Per layer: softmax over layers, cumulative sum, minus the first (the torch path's formula, float32)."""
        raw = self.file.float32("model.lower_bounds", (self.spec.num_layers, self.spec.hidden_size))
        e = np.exp(raw - raw.max(axis=0, keepdims=True))
        lb = e / e.sum(axis=0, keepdims=True, dtype=np.float32)
        return np.ascontiguousarray(np.cumsum(lb, axis=0, dtype=np.float32) - lb[0])

    def _matrix(self, prefix: str, layout: dict) -> Matrix:
        name = f"{prefix}.weight"
        rows, cols = layout[name].shape
        where = str(self.file.path)
        if cols >= MAX_COLS:
            raise ConfigError(f"{where}: '{name}' has {cols} columns, too many for the C kernels (limit {MAX_COLS})")
        shape = (rows, padded_cols(cols) // 4)
        self.file.entry(name + PACKED_SUFFIX, shape, ("U8",))
        codes = self._codes[self._at:self._at + rows * shape[1]].reshape(shape)
        self._at += codes.size
        self.file.read_into(name + PACKED_SUFFIX, codes)
        check_codes(codes, cols, name + PACKED_SUFFIX, where)
        scale = float(self.file.read(name + SCALE_SUFFIX, (), ("F32",)))
        if not (np.isfinite(scale) and scale > 0):
            raise CheckpointError(f"{where}: tensor '{name}{SCALE_SUFFIX}' is {scale}, expected a positive finite scale")
        return Matrix(codes, self.file.float32(f"{prefix}.norm.weight", (cols,)), scale, rows, cols)

    def _layer(self, n: int, lower: np.ndarray | None, layout: dict) -> Layer:
        p, h, d = f"model.layers.{n}", self.spec.hidden_size, recurrence_width(self.spec)
        gain = self.file.float32
        return Layer(attn_norm=gain(f"{p}.attn_norm.weight", (h,)), i_proj=self._matrix(f"{p}.attn.i_proj", layout),
                     f_proj=self._matrix(f"{p}.attn.f_proj", layout), g_proj=self._matrix(f"{p}.attn.g_proj", layout),
                     g_norm=gain(f"{p}.attn.g_norm.weight", (d // self.spec.num_heads,)),
                     o_proj=self._matrix(f"{p}.attn.o_proj", layout), mlp_norm=gain(f"{p}.mlp_norm.weight", (h,)),
                     gate_proj=self._matrix(f"{p}.mlp.gate_proj", layout),
                     down_proj=self._matrix(f"{p}.mlp.down_proj", layout),
                     lower_bound=lower[n] if lower is not None and n > 0 else None)

    @staticmethod
    def _layer_view(layer: Layer) -> LayerView:
        return LayerView(attn_norm=layer.attn_norm.ctypes.data, i_proj=layer.i_proj.view(),
                         f_proj=layer.f_proj.view(), g_proj=layer.g_proj.view(), g_norm=layer.g_norm.ctypes.data,
                         o_proj=layer.o_proj.view(), mlp_norm=layer.mlp_norm.ctypes.data,
                         gate_proj=layer.gate_proj.view(), down_proj=layer.down_proj.view(),
                         lower_bound=None if layer.lower_bound is None else layer.lower_bound.ctypes.data)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """float32 [..., hidden] rows of the embedding table for token ids (checked to be in range)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.spec.vocab_size):
            raise MemwiseError(f"token ids must be in [0, {self.spec.vocab_size}), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        rows = self.file.read_rows("model.embeddings.weight", ids.reshape(-1))
        return as_float32(rows, self.embedding_dtype).reshape(*ids.shape, -1)

    def weights_bytes(self) -> int:
        """Bytes of weights the model reads: codes, gains, bounds, scales and the whole embedding table
        (which stays in the file: only its rows are read)."""
        gains = sum(a.nbytes for layer in self.layers for a in (layer.attn_norm, layer.g_norm, layer.mlp_norm))
        gains += sum(m.gain.nbytes + 4 for m in self._matrices()) + self.final_norm.nbytes
        bounds = 0 if self.lower_bounds is None else self.lower_bounds.nbytes
        return self._codes.nbytes + gains + bounds + self.embedding_bytes

    def decode_bytes_per_token(self) -> int:
        """What one decode step reads: everything but the embedding table, of which it reads one row."""
        return self.weights_bytes() - self.embedding_bytes

    def _matrices(self) -> list[Matrix]:
        out = [self.lm_head]
        for layer in self.layers:
            out += [layer.i_proj, layer.f_proj, layer.g_proj, layer.o_proj, layer.gate_proj, layer.down_proj]
        return out
