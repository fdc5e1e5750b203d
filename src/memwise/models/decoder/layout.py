"""Where each parameter of the Decoder comes from in a Hugging Face checkpoint of each family.

Checkpoint quirks live here, as data, so that the Decoder's forward pass has no per-family branches:
GPT-2's Conv1D matrices are stored [in, out] and are transposed; separate q/k/v (and llama's gate/up)
matrices are copied into row slices of one fused matrix; OPT's position table has two leading rows
that no position ever indexes, and they are dropped. The same plan gives the parameter count and
the weight sizes, so what is counted is what is loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

from memwise.checkpoint import CheckpointReader
from memwise.dtypes import DTYPES
from memwise.spec import ModelSpec, per_layer_linear


@dataclass(frozen=True)
class TensorSource:
    parameter: str                      # name in Decoder.named_parameters()
    name: str                           # name in the checkpoint
    shape: tuple[int, ...]              # as stored in the checkpoint
    transpose: bool = False
    skip_rows: int = 0                  # leading rows of the stored tensor that are not copied
    rows: tuple[int, int] | None = None  # row range of the parameter that receives the tensor

    def loaded_numel(self) -> int:
        return (self.shape[0] - self.skip_rows) * math.prod(self.shape[1:])


def _prefix(reader: CheckpointReader | None, probe: str, candidates: tuple[str, ...]) -> str:
    """The name prefix this checkpoint uses (e.g. "transformer." or none); the first when none matches
    or there is no checkpoint, so that the missing-tensor error names the usual spelling."""
    for prefix in candidates:
        if reader is not None and prefix + probe in reader:
            return prefix
    return candidates[0]


def _linear(param: str, name: str, out_features: int, in_features: int, bias: bool,
            rows: tuple[int, int] | None = None) -> Iterator[TensorSource]:
    yield TensorSource(f"{param}.weight", f"{name}.weight", (out_features, in_features), rows=rows)
    if bias:
        yield TensorSource(f"{param}.bias", f"{name}.bias", (out_features,), rows=rows)


def _norm(spec: ModelSpec, param: str, name: str, size: int) -> Iterator[TensorSource]:
    yield TensorSource(f"{param}.weight", f"{name}.weight", (size,))
    if spec.norm == "layernorm":
        yield TensorSource(f"{param}.bias", f"{name}.bias", (size,))


def _attention(spec: ModelSpec, src: str, dst: str, norm: str, out_proj: str) -> Iterator[TensorSource]:
    """A layer's attention norm and self_attn with separate q/k/v (opt, phi, llama), copied into the
    row slices of the fused qkv matrix."""
    hidden, q_rows, kv_rows = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    yield from _norm(spec, f"{dst}.attn_norm", f"{src}.{norm}", hidden)
    bounds = {"q_proj": (0, q_rows), "k_proj": (q_rows, q_rows + kv_rows),
              "v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
    for name, (start, end) in bounds.items():
        yield from _linear(f"{dst}.attn.qkv", f"{src}.self_attn.{name}", end - start, hidden, spec.attention_bias,
                           rows=(start, end))
    yield from _linear(f"{dst}.attn.out", f"{src}.self_attn.{out_proj}", hidden, q_rows, spec.attention_out_bias)


def _mlp(spec: ModelSpec, dst: str, up: str, down: str) -> Iterator[TensorSource]:
    yield from _linear(f"{dst}.mlp.up", up, spec.intermediate_size, spec.hidden_size, spec.mlp_bias)
    yield from _linear(f"{dst}.mlp.down", down, spec.hidden_size, spec.intermediate_size, spec.mlp_bias)


def _gpt2_layer(spec: ModelSpec, src: str, dst: str) -> Iterator[TensorSource]:
    h, inner = spec.hidden_size, spec.intermediate_size
    yield from _norm(spec, f"{dst}.attn_norm", f"{src}.ln_1", h)
    # Conv1D: weight [in, out], y = x @ W + b
    for param, name, n_in, n_out in ((f"{dst}.attn.qkv", f"{src}.attn.c_attn", h, 3 * h),
                                     (f"{dst}.attn.out", f"{src}.attn.c_proj", h, h),
                                     (f"{dst}.mlp.up", f"{src}.mlp.c_fc", h, inner),
                                     (f"{dst}.mlp.down", f"{src}.mlp.c_proj", inner, h)):
        yield TensorSource(f"{param}.weight", f"{name}.weight", (n_in, n_out), transpose=True)
        yield TensorSource(f"{param}.bias", f"{name}.bias", (n_out,))
    yield from _norm(spec, f"{dst}.mlp_norm", f"{src}.ln_2", h)


def _opt_layer(spec: ModelSpec, src: str, dst: str) -> Iterator[TensorSource]:
    yield from _attention(spec, src, dst, "self_attn_layer_norm", "out_proj")
    yield from _norm(spec, f"{dst}.mlp_norm", f"{src}.final_layer_norm", spec.hidden_size)
    yield from _mlp(spec, dst, f"{src}.fc1", f"{src}.fc2")


def _phi_layer(spec: ModelSpec, src: str, dst: str) -> Iterator[TensorSource]:
    yield from _attention(spec, src, dst, "input_layernorm", "dense")
    yield from _mlp(spec, dst, f"{src}.mlp.fc1", f"{src}.mlp.fc2")


def _llama_layer(spec: ModelSpec, src: str, dst: str) -> Iterator[TensorSource]:
    h, inner = spec.hidden_size, spec.intermediate_size
    yield from _attention(spec, src, dst, "input_layernorm", "o_proj")
    yield from _norm(spec, f"{dst}.mlp_norm", f"{src}.post_attention_layernorm", h)
    # gate and up share one matrix: rows [0, inner) gate, [inner, 2 inner) up
    yield from _linear(f"{dst}.mlp.up", f"{src}.mlp.gate_proj", inner, h, spec.mlp_bias, rows=(0, inner))
    yield from _linear(f"{dst}.mlp.up", f"{src}.mlp.up_proj", inner, h, spec.mlp_bias, rows=(inner, 2 * inner))
    yield from _linear(f"{dst}.mlp.down", f"{src}.mlp.down_proj", h, inner, spec.mlp_bias)


@dataclass(frozen=True)
class _Naming:
    """How one family names its tensors; every name but the lm_head's follows the outer prefix."""

    prefixes: tuple[str, ...]   # outer name prefixes that checkpoints use, the usual one first
    embed: str
    positions: str | None       # the learned position table, if the family has one
    layers: str
    final_norm: str
    layer: Callable[[ModelSpec, str, str], Iterator[TensorSource]]


_NAMING = {
    "gpt2": _Naming(("transformer.", ""), "wte", "wpe", "h", "ln_f", _gpt2_layer),
    "opt": _Naming(("model.decoder.", "decoder."), "embed_tokens", "embed_positions", "layers", "final_layer_norm",
                   _opt_layer),
    "phi": _Naming(("model.", ""), "embed_tokens", None, "layers", "final_layernorm", _phi_layer),
    "llama": _Naming(("model.", ""), "embed_tokens", None, "layers", "norm", _llama_layer),
}
_NAMING["mistral"] = _NAMING["llama"]


def _plan(spec: ModelSpec, reader: CheckpointReader | None) -> Iterator[TensorSource]:
    naming = _NAMING[spec.model_type]
    p = _prefix(reader, f"{naming.embed}.weight", naming.prefixes)
    h, e = spec.hidden_size, spec.embed_dim
    yield TensorSource("embed.weight", f"{p}{naming.embed}.weight", (spec.vocab_size, e))
    if naming.positions is not None:
        yield TensorSource("positions.weight", f"{p}{naming.positions}.weight",
                           (spec.max_positions + spec.position_offset, h), skip_rows=spec.position_offset)
    if e != h:  # opt-350m's narrower embeddings
        yield TensorSource("project_in.weight", f"{p}project_in.weight", (h, e))
        yield TensorSource("project_out.weight", f"{p}project_out.weight", (e, h))
    for i in range(spec.num_layers):
        yield from naming.layer(spec, f"{p}{naming.layers}.{i}", f"layers.{i}")
    if spec.final_norm:
        yield from _norm(spec, "norm", f"{p}{naming.final_norm}", h)
    if not spec.tie_word_embeddings:
        yield from _linear("lm_head", "lm_head", spec.vocab_size, e, spec.lm_head_bias)


def checkpoint_plan(spec: ModelSpec, reader: CheckpointReader | None = None) -> list[TensorSource]:
    """Every tensor to read, in checkpoint order of layers, and where it goes; names spelled as in
    `reader` when given (checkpoints differ in their outer prefix), else as Hugging Face saves them."""
    return list(_plan(spec, reader))


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of the checkpoint, as transformers counts them: a tied matrix once, OPT's two unused
    position rows included."""
    return per_layer_linear(lambda s: sum(math.prod(source.shape) for source in checkpoint_plan(s)), spec)


def weight_sizes(spec: ModelSpec) -> dict[str, int]:
    """Bytes the loaded model holds for weights at each dtype (OPT's unused position rows left out)."""
    held = per_layer_linear(lambda s: sum(source.loaded_numel() for source in checkpoint_plan(s)), spec)
    return {name: held * dtype.itemsize for name, dtype in DTYPES.items()}
