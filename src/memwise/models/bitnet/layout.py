"""Every tensor of a bitnet checkpoint (transformers' names and shapes), and what they weigh."""
from __future__ import annotations

import math

from memwise.models.ternary.packed_format import TensorSlot, packed_bytes
from memwise.spec import ModelSpec, per_layer_linear

# The sub-norms before o_proj and down_proj, as each flavour names them (spec.model_type).
SUB_NORMS = {"bitnet": ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
             "llama": ("self_attn.inner_attn_ln", "mlp.ffn_layernorm")}


def projections(spec: ModelSpec) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The matrices of one layer that read the same normalized input, in buffer order, each group with
    the RMSNorm applied before it: each group is one integer product over its matrices' stacked rows."""
    attn_sub_norm, ffn_sub_norm = SUB_NORMS[spec.model_type]
    return (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            (attn_sub_norm, ("self_attn.o_proj",)),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            (ffn_sub_norm, ("mlp.down_proj",)))


def matrix_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """[out, in] of each ternary matrix of a layer, by its name within the layer."""
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def checkpoint_layout(spec: ModelSpec) -> list[TensorSlot]:
    """Every tensor the model reads, under its transformers name (ternary matrices as `NAME.weight`).

    The lm_head is full precision, as transformers keeps it; a tied checkpoint has none."""
    h = spec.hidden_size
    shapes = matrix_shapes(spec)
    slots = [TensorSlot("model.embed_tokens.weight", (spec.vocab_size, h), False)]
    for n in range(spec.num_layers):
        p = f"model.layers.{n}"
        for norm, matrices in projections(spec):
            slots.append(TensorSlot(f"{p}.{norm}.weight", (shapes[matrices[0]][1],), False))
            slots.extend(TensorSlot(f"{p}.{m}.weight", shapes[m], True) for m in matrices)
    slots.append(TensorSlot("model.norm.weight", (h,), False))
    if not spec.tie_word_embeddings:
        slots.append(TensorSlot("lm_head.weight", (spec.vocab_size, h), False))
    return slots


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of the latent checkpoint: 2,412,820,480 for bitnet-b1.58-2B-4T (tied),
    728,842,752 for 1bitLLM's bitnet_b1_58-large (tied, with its two sub-norms)."""
    return per_layer_linear(lambda s: sum(math.prod(slot.shape) for slot in checkpoint_layout(s)), spec)


def weight_sizes(spec: ModelSpec) -> dict[str, int]:
    """Bytes of weights: the latent bf16 checkpoint, and what the packed model holds.

    "packed 2-bit" counts what `load`/`synthetic` keep: packed codes (rows padded to 128 weights), a
    float32 scale per matrix, the embedding and lm_head in bf16, norm gains in float32."""
    return {"bfloat16": 2 * parameter_count(spec), "packed 2-bit": per_layer_linear(_packed_bytes, spec)}


def _packed_bytes(spec: ModelSpec) -> int:
    total = 0
    for slot in checkpoint_layout(spec):
        if slot.ternary:
            total += packed_bytes(*slot.shape) + 4
        elif slot.name in ("model.embed_tokens.weight", "lm_head.weight"):
            total += math.prod(slot.shape) * 2
        else:
            total += math.prod(slot.shape) * 4
    return total
