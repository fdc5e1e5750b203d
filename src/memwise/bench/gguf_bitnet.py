"""GGUF files of memwise's BitNet b1.58 models, for llama.cpp's `bitnet` architecture.

llama.cpp's `bitnet` graph is 1bitLLM's Llama-shaped BitNet b1.58 (bitnet_b1_58-large / -3B): RMSNorm
before q/k/v and gate/up, a sub-norm before o_proj (attn_sub_norm) and before down_proj (ffn_sub_norm),
silu GLU, rotate-half rotary (its NEOX rope type: no row permutation), and no output matrix: the logits
multiply by token_embd. BitNet b1.58 2B-4T (relu^2) is a different graph that upstream llama.cpp does
not build (bitnet.cpp, a fork, does), so it is refused here.

The tensors come from the loaded memwise model itself (a preset's packed random codes, or a checkpoint
as memwise quantized it): every ternary matrix is written as its codes times its one scale m. Through
gguf's TQ2_0 / TQ1_0 quantizer the block scale of such values is max |t m| = m, so the codes are exact
and m is rounded to float16 (the block's scale type). Embedding F16, norm gains F32. 1bitLLM's models
are tied; an untied lm_head would have no place in the file, so such a model is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from memwise.bench.gguf_format import TERNARY_TYPES, write_metadata, tensor_bytes, encode, gguf_type
from memwise.errors import UnsupportedError

ARCH = "bitnet"
# llama.cpp's names for a layer's projections, in the order memwise stacks them (bitnet/layout.projections)
_GROUPS = (("attn_norm", ("attn_q", "attn_k", "attn_v")), ("attn_sub_norm", ("attn_output",)),
           ("ffn_norm", ("ffn_gate", "ffn_up")), ("ffn_sub_norm", ("ffn_down",)))

Tensor = tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]   # name, shape, GGUF type, values


def check_exportable(spec: Any) -> None:
    if not spec.tie_word_embeddings:
        raise UnsupportedError("llama.cpp's bitnet graph has no output matrix (its logits use the embedding); "
                               "this BitNet model has its own lm_head")
    if spec.activation != "silu":
        raise UnsupportedError(f"llama.cpp's bitnet architecture is 1bitLLM's (silu GLU); this BitNet model's "
                               f"GLU is {spec.activation!r} (BitNet b1.58 2B-4T runs on bitnet.cpp, a llama.cpp fork)")


def tensors(model: Any, wanted: str) -> list[Tensor]:
    """Every tensor of the GGUF file, values drawn from the model one tensor at a time."""
    table_type = "F16" if wanted in TERNARY_TYPES else wanted

    def floats(tensor: Any) -> Callable[[], np.ndarray]:
        return lambda: tensor.detach().float().cpu().numpy()

    def matrix(projection: Any, index: int) -> Callable[[], np.ndarray]:
        def values() -> np.ndarray:
            weight = projection.weight(index)
            return weight.ternary().float().numpy() * np.float32(weight.scale)
        return values

    out: list[Tensor] = [("token_embd.weight", tuple(model.embeddings.shape), table_type, floats(model.embeddings))]
    for n, layer in enumerate(model.layers):
        modules = (layer.attn.qkv, layer.attn.out, layer.mlp.gate_up, layer.mlp.down)
        for (norm, names), projection in zip(_GROUPS, modules):
            out.append((f"blk.{n}.{norm}.weight", (projection.cols,), "F32", floats(projection.norm_weight)))
            for index, name in enumerate(names):
                shape = (projection.rows[index], projection.cols)
                out.append((f"blk.{n}.{name}.weight", shape, wanted, matrix(projection, index)))
    out.append(("output_norm.weight", tuple(model.norm.shape), "F32", floats(model.norm)))
    return out


def write_bitnet_gguf(path: Path, model: Any, dtype: str, name: str) -> None:
    """The model's weights as a llama.cpp `bitnet` GGUF file at `path` (through a temporary file)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    spec = model.spec
    check_exportable(spec)
    wanted = gguf_type(dtype)
    planned = tensors(model, wanted)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    writer = GGUFWriter(partial, ARCH)
    try:
        write_metadata(writer, spec, wanted, name)
        for tensor_name, shape, ggml_type, _ in planned:
            writer.add_tensor_info(tensor_name, shape, np.dtype(np.float32), tensor_bytes(shape, ggml_type),
                                   raw_dtype=GGMLQuantizationType[ggml_type])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor_name, _, ggml_type, values in planned:
            # the matrices are ternary already: the quantizer keeps their codes (no second ternarization)
            writer.write_tensor_data(encode(values(), ggml_type, tensor_name, ternarize=False))
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)

