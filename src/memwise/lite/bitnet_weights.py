"""A BitNet b1.58 model's weights as numpy buffers, read from a packed checkpoint, and the C step's view of them.

The buffers are the ones the torch path builds (memwise.models.bitnet.build), in the same forms:
every ternary matrix's codes in one buffer backed by huge pages, the matrices that read the same
norm (q/k/v, gate/up) consecutive so that each group is one stacked product, norm gains in float32,
the embedding and the lm_head in their stored dtype (bfloat16 kept as its raw 16 bits, multiplied by
the kernel library's _bf16 product as the torch path's bf16_linear does). A separate embedding table
stays in the file and is read a row per token (memwise.lite.packed_file); a tied one is the lm_head,
which every step reads whole, so it is held.

`ModelView` (memwise.models.bitnet.step_structs) holds raw pointers into these buffers and into the
KV cache the caller points it at; the BitNetWeights object keeps the buffers alive as long as it lives.
"""
from __future__ import annotations

import numpy as np

from memwise.errors import CheckpointError, ConfigError, MemwiseError, UnsupportedError
from memwise.kernels import MAX_COLS, last_level_cache_bytes
from memwise.kernels.packed_layout import padded_cols
from memwise.lite.hgrn_weights import check_codes, codes_buffer
from memwise.lite.packed_file import PackedFile, as_float32
from memwise.models.bitnet.layout import checkpoint_layout, projections
from memwise.models.bitnet.step_structs import LayerView, ModelView, ProjectionView, projection_view
from memwise.models.ternary.packed_format import PACKED_SUFFIX, SCALE_SUFFIX, packed_bytes
from memwise.spec import ModelSpec

EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
FLOAT_DTYPES = ("BF16", "F16", "F32")


def rotary_inv_freq(spec: ModelSpec) -> np.ndarray:
    """float32 [head_dim / 2]: 1 / theta^(2i / d), the default rotary embedding (the only one bitnet takes)."""
    exponents = np.arange(0, spec.rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(spec.rotary_dim)
    return np.ascontiguousarray(np.float32(1.0) / np.power(np.float32(spec.rope_theta), exponents), dtype=np.float32)


class Projection:
    """Matrices over one normalized input, stacked by rows: codes uint8 [sum(rows), padded_cols / 4]."""

    def __init__(self, codes: np.ndarray, gain: np.ndarray, rows: tuple[int, ...], scales: tuple[float, ...],
                 cols: int):
        self.codes, self.gain, self.rows, self.scales, self.cols = codes, gain, rows, scales, cols

    def view(self) -> ProjectionView:
        return projection_view(self.codes.ctypes.data, self.gain.ctypes.data, self.rows, self.scales)


class BitNetWeights:
    """Every tensor of a bitnet model from its packed checkpoint, and the ModelView over them."""

    def __init__(self, spec: ModelSpec, file: PackedFile):
        if spec.rotary_dim != spec.head_dim or spec.head_dim % 2 or spec.num_heads % spec.num_kv_heads:
            raise UnsupportedError(f"{file.path}: the fused step needs rotary over every dimension of an even "
                                   f"head_dim ({spec.rotary_dim} of {spec.head_dim}) and whole key/value groups")
        self.spec, self.file = spec, file
        slots = checkpoint_layout(spec)
        self._codes = codes_buffer(sum(packed_bytes(*s.shape) for s in slots if s.ternary))
        self._at = 0
        layout = {slot.name: slot for slot in slots}
        self.projections = [[self._projection(f"model.layers.{n}", norm, matrices, layout)
                             for norm, matrices in projections(spec)] for n in range(spec.num_layers)]
        self.final_norm = file.float32("model.norm.weight", (spec.hidden_size,))
        table = file.entry(EMBEDDING, (spec.vocab_size, spec.hidden_size), FLOAT_DTYPES)
        self.embedding_dtype, self.embedding_bytes = table.dtype, table.end - table.begin
        head = EMBEDDING if spec.tie_word_embeddings else LM_HEAD
        entry = file.entry(head, (spec.vocab_size, spec.hidden_size), FLOAT_DTYPES)
        # F16 has no C product: widened once, as the torch path's chunked float products compute it.
        self.lm_head = file.read(head) if entry.dtype != "F16" else as_float32(file.read(head), "F16")
        self.lm_head_dtype = "F32" if entry.dtype == "F16" else entry.dtype
        self.inv_freq = rotary_inv_freq(spec)
        self._layer_views = (LayerView * spec.num_layers)(*[
            LayerView(qkv=p[0].view(), o=p[1].view(), gate_up=p[2].view(), down=p[3].view()) for p in self.projections])
        self.view = ModelView(num_layers=spec.num_layers, hidden=spec.hidden_size, intermediate=spec.intermediate_size,
                              heads=spec.num_heads, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, max_length=0,
                              eps=spec.norm_eps, relu2=int(spec.activation == "relu2"),
                              weights_from_dram=int(self.decode_bytes_per_token() > last_level_cache_bytes()),
                              inv_freq=self.inv_freq.ctypes.data, layers=self._layer_views)

    def _projection(self, prefix: str, norm: str, matrices: tuple[str, ...], layout: dict) -> Projection:
        names = [f"{prefix}.{m}.weight" for m in matrices]
        rows = tuple(layout[name].shape[0] for name in names)
        cols = layout[names[0]].shape[1]
        where = str(self.file.path)
        if cols >= MAX_COLS:
            raise ConfigError(f"{where}: '{names[0]}' has {cols} columns, too many for the C kernels (limit {MAX_COLS})")
        width = padded_cols(cols) // 4
        stacked = self._codes[self._at:self._at + sum(rows) * width].reshape(sum(rows), width)
        self._at += stacked.size
        scales, at = [], 0
        for name, count in zip(names, rows):
            codes = stacked[at:at + count]
            self.file.entry(name + PACKED_SUFFIX, codes.shape, ("U8",))
            self.file.read_into(name + PACKED_SUFFIX, codes)
            check_codes(codes, cols, name + PACKED_SUFFIX, where)
            scale = float(self.file.read(name + SCALE_SUFFIX, (), ("F32",)))
            if not (np.isfinite(scale) and scale > 0):
                raise CheckpointError(f"{where}: tensor '{name}{SCALE_SUFFIX}' is {scale}, expected a positive "
                                      "finite scale")
            scales.append(scale)
            at += count
        return Projection(stacked, self.file.float32(f"{prefix}.{norm}.weight", (cols,)), rows, tuple(scales), cols)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """float32 [..., hidden] rows of the embedding table for token ids (checked to be in range)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.spec.vocab_size):
            raise MemwiseError(f"token ids must be in [0, {self.spec.vocab_size}), got "
                               f"{int(ids.min())}..{int(ids.max())}")
        if self.spec.tie_word_embeddings:
            rows = self.lm_head[ids.reshape(-1)]
            return as_float32(rows, self.lm_head_dtype).reshape(*ids.shape, -1)
        rows = self.file.read_rows(EMBEDDING, ids.reshape(-1))
        return as_float32(rows, self.embedding_dtype).reshape(*ids.shape, -1)

    def weights_bytes(self) -> int:
        """Bytes of weights the model reads: codes, gains, scales, the lm_head and the embedding table
        (held when tied, else in the file: only its rows are read)."""
        gains = sum(p.gain.nbytes + 4 * len(p.rows) for layer in self.projections for p in layer)
        table = 0 if self.spec.tie_word_embeddings else self.embedding_bytes
        return self._codes.nbytes + gains + self.final_norm.nbytes + self.lm_head.nbytes + table

    def decode_bytes_per_token(self) -> int:
        """What one decode step reads: everything but a separate embedding table, of which it reads one row."""
        table = 0 if self.spec.tie_word_embeddings else self.embedding_bytes
        return self.weights_bytes() - table
