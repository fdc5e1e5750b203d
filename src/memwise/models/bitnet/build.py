"""Building a BitNetForCausalLM from a weight source: a checkpoint (latent, transformers packed or
memwise packed) streamed one tensor at a time, or random codes."""
from __future__ import annotations

import dataclasses

import torch

from memwise.checkpoint import CheckpointReader
from memwise.dtypes import parse_dtype
from memwise.errors import CheckpointError, UnsupportedError
from memwise.kernels.packed import padded_cols
from memwise.models.bitnet.layout import checkpoint_layout, matrix_shapes, projections
from memwise.models.bitnet.modules import BitNetBlock, BitNetForCausalLM, GatedMLP, TernaryProjection
from memwise.models.bitnet.weights import weight_source
from memwise.models.decoder.modules import Attention
from memwise.models.ternary.packed_format import packed_bytes
from memwise.models.ternary.weights import RandomWeights, WeightSource, allocate_codes
from memwise.spec import ModelSpec

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def check_layout(spec: ModelSpec, reader: CheckpointReader, source: WeightSource) -> None:
    """The checkpoint's header against the config, before anything is allocated or read: the layer
    count, then every tensor's presence, shape and dtype. A mismatch of layer 0's attention is
    reported as the config's (head counts), since that is where it usually comes from."""
    config_path = f"{reader.directory}/config.json"
    reader.check_layer_count(spec.num_layers, config_path)
    shapes = matrix_shapes(spec)
    for name in ("self_attn.q_proj", "self_attn.k_proj"):
        try:
            source.check_matrix(f"model.layers.0.{name}.weight", *shapes[name])
        except CheckpointError as e:
            raise CheckpointError(f"{e} (see num_attention_heads {spec.num_heads} and num_key_value_heads "
                                  f"{spec.num_kv_heads} in {config_path})") from None
    for slot in checkpoint_layout(spec):
        if slot.ternary:
            source.check_matrix(slot.name, *slot.shape)
            continue
        reader.expect(slot.name, slot.shape, floating=True)


def _check_dtype(dtype: torch.dtype | str) -> None:
    if parse_dtype(dtype) is not torch.float32:
        raise UnsupportedError(f"bitnet computes in float32 (its weights are 2-bit ternary codes); "
                               f"dtype {str(dtype).removeprefix('torch.')} is not supported")


def _build(spec: ModelSpec, source: WeightSource, device: torch.device) -> BitNetForCausalLM:
    """The model's modules over the tensors of checkpoint_layout (names and shapes come from there)."""
    slots = checkpoint_layout(spec)
    layout = {slot.name: slot for slot in slots}
    codes, offsets = allocate_codes(slots, device)

    def tensor(name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        value = source.tensor(name, layout[name].shape)
        if dtype is None and value.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            dtype = torch.float32
        return value.to(device=device, dtype=dtype)

    def projection(prefix: str, norm: str, matrices: tuple[str, ...]) -> TernaryProjection:
        """The matrices (consecutive in the buffer, so their codes are one stacked matrix)."""
        names = [f"{prefix}.{m}.weight" for m in matrices]
        rows = [layout[n].shape[0] for n in names]
        cols = layout[names[0]].shape[1]
        start = offsets[names[0]]
        packed = codes[start:start + packed_bytes(sum(rows), cols)].view(sum(rows), padded_cols(cols) // 4)
        scales, at = [], 0
        for name, count in zip(names, rows):
            scales.append(source.matrix(name, cols, packed[at:at + count]).scale)
            at += count
        return TernaryProjection(packed, cols, scales, rows, tensor(f"{prefix}.{norm}.weight"), spec.norm_eps)

    embeddings = tensor("model.embed_tokens.weight", None)
    layers = []
    for n in range(spec.num_layers):
        p = f"model.layers.{n}"
        qkv, out, gate_up, down = (projection(p, norm, matrices) for norm, matrices in projections(spec))
        layers.append(BitNetBlock(Attention(spec, n, qkv, out), GatedMLP(gate_up, down, spec.activation)))
    lm_head = None if spec.tie_word_embeddings else tensor("lm_head.weight", None)
    return BitNetForCausalLM(spec, embeddings, layers, tensor("model.norm.weight"), lm_head).eval()


def load(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype | str = torch.float32,
         device: torch.device | str = "cpu") -> BitNetForCausalLM:
    """The model from a latent, transformers-packed or memwise-packed checkpoint, one tensor at a time."""
    _check_dtype(dtype)
    if spec.model_type == "llama" and not spec.tie_word_embeddings and "lm_head.weight" not in reader:
        # 1bitLLM's checkpoints hold no lm_head (their output is the embedding: llama.cpp's bitnet graph has
        # no output matrix either), whatever LlamaConfig's default for tie_word_embeddings says.
        spec = dataclasses.replace(spec, tie_word_embeddings=True)
    source = weight_source(reader)
    check_layout(spec, reader, source)
    with torch.no_grad():
        return _build(spec, source, torch.device(device))


def synthetic(spec: ModelSpec, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
              seed: int = 0) -> BitNetForCausalLM:
    """Random ternary codes generated packed (no latent matrices), scales ~0.02, bf16 embeddings."""
    _check_dtype(dtype)
    with torch.no_grad():
        return _build(spec, RandomWeights(seed, embeddings=EMBEDDINGS), torch.device(device))
