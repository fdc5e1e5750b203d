"""Every tensor of an hgrn_bit checkpoint (released names and shapes), and what they weigh."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from memwise.models.hgrn_bit.config import recurrence_width
from memwise.models.ternary.packed_format import TensorSlot, packed_bytes
from memwise.spec import ModelSpec, per_layer_linear

if TYPE_CHECKING:   # the layout serves the torch-free runtime (memwise.lite) too
    from memwise.checkpoint import CheckpointReader


def checkpoint_layout(spec: ModelSpec) -> list[TensorSlot]:
    """Every tensor the model reads, under its released name (ternary matrices as `NAME.weight`)."""
    h, d, i = spec.hidden_size, recurrence_width(spec), spec.intermediate_size
    slots = [TensorSlot("model.embeddings.weight", (spec.vocab_size, h), False)]
    if spec.use_lower_bound:
        slots.append(TensorSlot("model.lower_bounds", (spec.num_layers, h), False))

    def bitlinear(prefix: str, rows: int, cols: int) -> None:
        slots.append(TensorSlot(f"{prefix}.weight", (rows, cols), True))
        slots.append(TensorSlot(f"{prefix}.norm.weight", (cols,), False))

    for n in range(spec.num_layers):
        p = f"model.layers.{n}"
        slots.append(TensorSlot(f"{p}.attn_norm.weight", (h,), False))
        for proj in ("i_proj", "f_proj", "g_proj"):
            bitlinear(f"{p}.attn.{proj}", d, h)
        slots.append(TensorSlot(f"{p}.attn.g_norm.weight", (d // spec.num_heads,), False))
        bitlinear(f"{p}.attn.o_proj", h, d)
        slots.append(TensorSlot(f"{p}.mlp_norm.weight", (h,), False))
        bitlinear(f"{p}.mlp.gate_proj", 2 * i, h)
        bitlinear(f"{p}.mlp.down_proj", h, i)
    slots.append(TensorSlot("model.norm.weight", (h,), False))
    bitlinear("lm_head", spec.vocab_size, h)
    return slots


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of the released (latent) checkpoint: 374,108,160 for MMfreeLM-370M."""
    return per_layer_linear(lambda s: sum(math.prod(slot.shape) for slot in checkpoint_layout(s)), spec)


def weight_sizes(spec: ModelSpec) -> dict[str, int]:
    """Bytes of weights: the latent bf16 checkpoint as released, and what the packed model holds.

    "packed 2-bit" counts what `load`/`synthetic` keep in memory: packed codes (rows padded to 128
    weights), a float32 scale per matrix, the embedding in bf16, norm gains and lower bounds in float32.
    It equals `weights_bytes()` of a model whose embedding is stored in bf16.
    """
    return {"bfloat16": 2 * parameter_count(spec), "packed 2-bit": per_layer_linear(_packed_bytes, spec)}


def _packed_bytes(spec: ModelSpec) -> int:
    packed = 0
    for slot in checkpoint_layout(spec):
        if slot.ternary:
            packed += packed_bytes(*slot.shape) + 4
        elif slot.name == "model.embeddings.weight":
            packed += math.prod(slot.shape) * 2
        else:
            packed += math.prod(slot.shape) * 4
    return packed


def latent_name(spec: ModelSpec, reader: "CheckpointReader", name: str) -> str:
    """Tied checkpoints may omit lm_head.weight: the embedding is then the latent lm_head."""
    if name == "lm_head.weight" and name not in reader and spec.tie_word_embeddings:
        return "model.embeddings.weight"
    return name
