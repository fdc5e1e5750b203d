"""The GGUF format as memwise writes it, whatever the model: type names, tensor encoding (float,
Q8_0 / Q4_0, ternary TQ2_0 / TQ1_0), the byte-tokenizer vocabulary and the model metadata.
The per-family writers are gguf_export.py (the decoder family) and gguf_bitnet.py."""
from __future__ import annotations

from typing import Any

import numpy as np

from memwise.errors import UnsupportedError
from memwise.spec import ModelSpec

# --dtype of a llama.cpp cell -> GGUF type name
GGUF_TYPES = {"float32": "F32", "f32": "F32", "float16": "F16", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0",
              "tq2_0": "TQ2_0", "tq1_0": "TQ1_0"}
TERNARY_TYPES = ("TQ2_0", "TQ1_0")
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
               "TQ2_0": "MOSTLY_TQ2_0", "TQ1_0": "MOSTLY_TQ1_0"}
def gguf_type(dtype: str) -> str:
    """The GGUF type name a cell's dtype asks for (F32, F16, Q8_0, Q4_0, TQ2_0, TQ1_0)."""
    try:
        return GGUF_TYPES[dtype.lower()]
    except KeyError:
        raise UnsupportedError(f"dtype {dtype!r} has no GGUF type (one of: {', '.join(GGUF_TYPES)})") from None


def ternary_values(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """(codes t in {-1, 0, 1} as int8, scale m) of a matrix, as memwise ternarizes a latent one."""
    import torch

    from memwise.kernels.packed import quantize_latent

    codes, scale = quantize_latent(torch.from_numpy(matrix))
    return codes.to(torch.int8).numpy(), float(scale)


def encode(values: np.ndarray, ggml_type: str, name: str, ternarize: bool = True) -> np.ndarray:
    """One tensor's data in a GGUF type: float32/float16 arrays, or the quantized bytes (a ternary type's
    values ternarized first unless they are ternary already)."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[ggml_type]
    block = quants.GGML_QUANT_SIZES[qtype][0]
    if values.shape[-1] % block:
        raise UnsupportedError(f"GGUF export: tensor {name!r} has rows of {values.shape[-1]} values, which {ggml_type} "
                               f"cannot store (blocks of {block})")
    if ggml_type in TERNARY_TYPES and ternarize:
        codes, scale = ternary_values(values)
        values = codes.astype(np.float32) * np.float32(scale)
    return quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def tensor_bytes(shape: tuple[int, ...], ggml_type: str) -> int:
    from gguf import GGMLQuantizationType, quants

    block, size = quants.GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    return int(np.prod(shape)) // block * size


def byte_vocab(spec: ModelSpec) -> tuple[list[str], list[int]]:
    """memwise's byte tokenizer as a SentencePiece-style vocabulary: ids 0-255 are the byte tokens
    <0x00>..<0xFF> (llama.cpp maps text to them by byte fallback), the others placeholders; the
    config's BOS/EOS ids above 255 are control tokens."""
    from gguf import TokenType

    tokens, types = [], []
    specials = {spec.bos_token_id, *spec.eos_token_ids}
    for i in range(spec.vocab_size):
        if i < 256:
            tokens.append(f"<0x{i:02X}>")
            types.append(int(TokenType.BYTE))
        else:
            tokens.append(f"<memwise_{i}>")
            types.append(int(TokenType.CONTROL if i in specials else TokenType.UNUSED))
    return tokens, types


def write_metadata(writer: Any, spec: ModelSpec, wanted: str, name: str) -> None:
    from gguf import LlamaFileType

    writer.add_name(name)
    writer.add_file_type(int(LlamaFileType[_FILE_TYPES[wanted]]))
    writer.add_context_length(spec.max_positions)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_vocab_size(spec.vocab_size)
    if spec.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(spec.norm_eps)
    else:
        writer.add_layer_norm_eps(spec.norm_eps)
    if spec.positions == "rotary":
        writer.add_rope_dimension_count(spec.rotary_dim)
        writer.add_rope_freq_base(spec.rope_theta)
    tokens, types = byte_vocab(spec)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for token_id, add in ((spec.bos_token_id, writer.add_bos_token_id), (next(iter(spec.eos_token_ids), None),
                                                                         writer.add_eos_token_id)):
        if token_id is not None and 0 <= token_id < spec.vocab_size:
            add(token_id)
    writer.add_string("memwise.tokenizer", "byte ids: the bench feeds token ids, not text")
