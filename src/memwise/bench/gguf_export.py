"""GGUF files of the weights memwise runs, so that llama.cpp can be measured on the same model.

memwise writes the file itself, with the `gguf` package (pure Python), from the very tensors a memwise
cell holds: a preset's seeded random weights (drawn again, one tensor at a time, by
decoder.synthetic_tensors) or a checkpoint as memwise loads it. Files are cached per model and GGUF
type under $XDG_CACHE_HOME/memwise/gguf (default ~/.cache/memwise/gguf) and written atomically.

Types: F32 and F16 (1-d tensors always F32, as llama.cpp requires), Q8_0 and Q4_0 through gguf's own
quantize functions, and TQ2_0 / TQ1_0: each matrix ternarized once as memwise ternarizes a latent
matrix (t = clamp(round(W / m), -1, 1), m = mean |W|), written through gguf's quantizer, whose block
scale is then max |t m| = m, so the codes are exact. Embedding tables stay F16 in ternary files (one row
is read per token, like memwise's bf16 embedding of HGRN-Bit).

Architectures: gpt2, phi (llama.cpp's "phi2", whose partial rotary is rotate-half like Hugging Face's),
and llama / mistral (as llama.cpp's "llama": q and k rows permuted from Hugging Face's rotate-half order
to llama.cpp's interleaved rotary); BitNet b1.58 of 1bitLLM's shape as llama.cpp's "bitnet"
(bench/gguf_bitnet.py). The vocabulary is memwise's byte tokenizer
(ids 0-255 are the bytes, the rest placeholders) for every model: the bench feeds token ids, so no text
tokenizer is needed; a real checkpoint's own tokenizer is not exported.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from memwise.bench.gguf_format import TERNARY_TYPES, write_metadata, tensor_bytes, encode, gguf_type
from memwise.errors import MemwiseError, UnsupportedError
from memwise.spec import ModelSpec

EXPORT_VERSION = 1      # part of every cached file's name: a change of layout writes new files

_ARCHES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "phi": "phi2"}
_FUSED_QKV = ("gpt2", "phi")     # llama.cpp reads these q|k|v rows as one attn_qkv matrix
_TABLES = ("token_embd.weight", "position_embd.weight")     # read one row per token


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memwise" / "gguf"


def _model_key(source: str, directory: Path | None, config: dict[str, Any] | None = None) -> str:
    """A preset's name with a digest of its config, or a local directory's name with a digest of its path
    and files' sizes and times, so that a changed preset or checkpoint gets a new file."""
    if directory is None:
        digest = hashlib.sha1(json.dumps(config or {}, sort_keys=True).encode()).hexdigest()[:8]
        return f"preset-{source.removeprefix('preset:')}-{digest}-seed0"
    stats = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(directory.iterdir()) if p.is_file()]
    digest = hashlib.sha1("\n".join([str(directory.resolve()), *stats]).encode()).hexdigest()[:12]
    return f"{directory.name}-{digest}"


@dataclass(frozen=True)
class PlannedTensor:
    name: str                           # GGUF name
    parameter: str                      # memwise Decoder parameter it comes from
    shape: tuple[int, ...]              # as torch holds it: [rows, cols] or [n]
    rows: tuple[int, int] | None        # row slice of the parameter
    permute_heads: int                  # > 0: rotary rows permuted for llama.cpp with this many heads
    ggml_type: str


def _tensor_type(name: str, shape: tuple[int, ...], wanted: str) -> str:
    if len(shape) == 1:
        return "F32"
    if name == "position_embd.weight":
        return "F32"    # as llama.cpp's converter keeps it: small, and added to every token's input
    if wanted in TERNARY_TYPES and name in _TABLES:
        return "F16"
    return wanted


def _names(spec: ModelSpec, parameter: str, shape: tuple[int, ...]) -> Iterator[tuple[str, tuple[int, int] | None, int]]:
    """(GGUF name, row slice, heads to permute) of the tensors one Decoder parameter becomes."""
    kind = parameter.rsplit(".", 1)[-1]     # weight | bias
    fixed = {"embed.weight": "token_embd.weight", "positions.weight": "position_embd.weight",
             "lm_head.weight": "output.weight", "lm_head.bias": "output.bias", "norm.weight": "output_norm.weight",
             "norm.bias": "output_norm.bias"}
    if parameter in fixed:
        yield fixed[parameter], None, 0
        return
    if not parameter.startswith("layers."):
        raise UnsupportedError(f"GGUF export: no GGUF tensor for memwise parameter {parameter!r}")
    _, index, rest = parameter.split(".", 2)
    blk = f"blk.{index}."
    simple = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.out": "attn_output", "mlp.down": "ffn_down"}
    module = rest.rsplit(".", 1)[0]
    if module in simple:
        yield f"{blk}{simple[module]}.{kind}", None, 0
    elif module == "attn.qkv" and spec.model_type in _FUSED_QKV:
        yield f"{blk}attn_qkv.{kind}", None, 0
    elif module == "attn.qkv":
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        yield f"{blk}attn_q.{kind}", (0, q), spec.num_heads
        yield f"{blk}attn_k.{kind}", (q, q + kv), spec.num_kv_heads
        yield f"{blk}attn_v.{kind}", (q + kv, q + 2 * kv), 0
    elif module == "mlp.up" and spec.gated_mlp:
        inner = spec.intermediate_size
        yield f"{blk}ffn_gate.{kind}", (0, inner), 0
        yield f"{blk}ffn_up.{kind}", (inner, 2 * inner), 0
    elif module == "mlp.up":
        yield f"{blk}ffn_up.{kind}", None, 0
    else:
        raise UnsupportedError(f"GGUF export: no GGUF tensor for memwise parameter {parameter!r}")


def plan(spec: ModelSpec, wanted: str) -> list[PlannedTensor]:
    """Every GGUF tensor of a Decoder, in the order of its parameters, with its type."""
    from memwise.models.decoder.build import parameter_shapes

    if spec.model_type not in _ARCHES:
        raise UnsupportedError(f"GGUF export supports {', '.join(_ARCHES)}, not model_type {spec.model_type!r}")
    if spec.rope_scaling is not None:
        raise UnsupportedError("GGUF export: rope scaling is not written yet")
    planned = []
    for parameter, shape in parameter_shapes(spec):
        for name, rows, heads in _names(spec, parameter, shape):
            part = shape if rows is None else (rows[1] - rows[0], *shape[1:])
            planned.append(PlannedTensor(name, parameter, part, rows, heads, _tensor_type(name, part, wanted)))
    return planned


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half rows of each head -> llama.cpp's interleaved pairs (its converter's permute)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(path: Path, spec: ModelSpec, dtype: str, tensors: Callable[[], Iterator[tuple[str, Any]]],
               name: str = "memwise") -> list[PlannedTensor]:
    """Write the Decoder's weights, as `tensors()` yields them (name, float tensor) in parameter order, to
    a GGUF file at `path` (through a temporary file beside it). One tensor is held at a time: the
    header is written from the plan, then each tensor's data as it comes."""
    from gguf import GGMLQuantizationType, GGUFWriter

    wanted = gguf_type(dtype)
    planned = plan(spec, wanted)
    by_parameter: dict[str, list[PlannedTensor]] = {}
    for item in planned:
        by_parameter.setdefault(item.parameter, []).append(item)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    writer = GGUFWriter(partial, _ARCHES[spec.model_type])
    try:
        write_metadata(writer, spec, wanted, name)
        for item in planned:
            qtype = GGMLQuantizationType[item.ggml_type]
            writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), tensor_bytes(item.shape, item.ggml_type),
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        written = 0
        for parameter, tensor in tensors():
            values = tensor.detach().float().cpu().numpy()
            for item in by_parameter[parameter]:
                part = values if item.rows is None else values[item.rows[0]:item.rows[1]]
                if item.permute_heads:
                    part = _permute(part, item.permute_heads)
                writer.write_tensor_data(encode(part, item.ggml_type, item.name))
                written += 1
        if written != len(planned):
            raise MemwiseError(f"GGUF export: {written} of {len(planned)} tensors came from the model")
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return planned


def export(source: str, dtype: str, directory: Path | None = None) -> Path:
    """The cached GGUF file of a memwise source at a cell's dtype, written first if missing."""
    from memwise.source import resolve_model

    resolved = resolve_model(source)
    spec = resolved.spec
    if spec.model_type == "hgrn_bit":
        raise UnsupportedError("llama.cpp has no hgrn_bit architecture; its same-work peer is the Llama model "
                               "of the same matrix shapes, preset NAME-shapes (e.g. mmfree-2.7b-shapes)")
    wanted = gguf_type(dtype)
    key = _model_key(source, resolved.directory, resolved.config)
    path = (directory or cache_dir()) / key / f"v{EXPORT_VERSION}-{wanted}.gguf"
    if path.is_file():
        return path
    if resolved.family.__name__ == "memwise.models.bitnet":
        import memwise
        from memwise.bench.gguf_bitnet import check_exportable, write_bitnet_gguf

        check_exportable(spec)
        write_bitnet_gguf(path, memwise.load(source).module, dtype, name=key)
        return path
    if resolved.synthetic:
        from memwise.models.decoder.build import synthetic_tensors

        def tensors() -> Iterator[tuple[str, Any]]:
            return synthetic_tensors(spec, seed=0)     # memwise.load's seed for presets
    else:
        import memwise

        model = memwise.load(source, dtype="float32")

        def tensors() -> Iterator[tuple[str, Any]]:
            return iter(model.module.named_parameters())
    write_gguf(path, spec, dtype, tensors, name=key)
    return path
