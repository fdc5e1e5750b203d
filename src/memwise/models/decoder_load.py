"""Where each parameter of the Decoder comes from in a Hugging Face checkpoint of each family.

Checkpoint quirks live here, as data, so that the Decoder's forward pass has no per-family branches:
GPT-2's Conv1D matrices are stored [in, out] and are transposed; separate q/k/v (and llama's gate/up)
matrices are copied into row slices of one fused matrix; OPT's position table has two leading rows
that no position ever indexes, and they are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from memwise.checkpoint import CheckpointReader
from memwise.spec import ModelSpec


@dataclass(frozen=True)
class TensorSource:
    parameter: str                      # name in Decoder.named_parameters()
    name: str                           # name in the checkpoint
    shape: tuple[int, ...]              # as stored in the checkpoint
    transpose: bool = False
    skip_rows: int = 0                  # leading rows of the stored tensor that are not copied
    rows: tuple[int, int] | None = None  # row range of the parameter that receives the tensor


def _prefix(reader: CheckpointReader, probe: str, candidates: tuple[str, ...]) -> str:
    """The name prefix this checkpoint uses (e.g. "transformer." or none); the first when none matches,
    so that the missing-tensor error names the usual spelling."""
    for prefix in candidates:
        if prefix + probe in reader:
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


def _fused_qkv(spec: ModelSpec, layer: str, names: tuple[str, str, str], out_name: str) -> Iterator[TensorSource]:
    hidden, q_rows, kv_rows = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    bounds = ((0, q_rows), (q_rows, q_rows + kv_rows), (q_rows + kv_rows, q_rows + 2 * kv_rows))
    for name, (start, end) in zip(names, bounds):
        yield from _linear(f"{layer}.attn.qkv", name, end - start, hidden, spec.attention_bias, rows=(start, end))
    yield from _linear(f"{layer}.attn.out", out_name, hidden, q_rows, spec.attention_out_bias)


def _gpt2(spec: ModelSpec, reader: CheckpointReader) -> Iterator[TensorSource]:
    p = _prefix(reader, "wte.weight", ("transformer.", ""))
    h, inner = spec.hidden_size, spec.intermediate_size
    yield TensorSource("embed.weight", f"{p}wte.weight", (spec.vocab_size, h))
    yield TensorSource("positions.weight", f"{p}wpe.weight", (spec.max_positions, h))
    for i in range(spec.num_layers):
        src, dst = f"{p}h.{i}", f"layers.{i}"
        yield from _norm(spec, f"{dst}.attn_norm", f"{src}.ln_1", h)
        # Conv1D: weight [in, out], y = x @ W + b
        for param, name, n_in, n_out in ((f"{dst}.attn.qkv", f"{src}.attn.c_attn", h, 3 * h),
                                         (f"{dst}.attn.out", f"{src}.attn.c_proj", h, h),
                                         (f"{dst}.mlp.up", f"{src}.mlp.c_fc", h, inner),
                                         (f"{dst}.mlp.down", f"{src}.mlp.c_proj", inner, h)):
            yield TensorSource(f"{param}.weight", f"{name}.weight", (n_in, n_out), transpose=True)
            yield TensorSource(f"{param}.bias", f"{name}.bias", (n_out,))
        yield from _norm(spec, f"{dst}.mlp_norm", f"{src}.ln_2", h)
    yield from _norm(spec, "norm", f"{p}ln_f", h)
    if not spec.tie_word_embeddings:
        yield TensorSource("lm_head.weight", "lm_head.weight", (spec.vocab_size, h))


def _opt(spec: ModelSpec, reader: CheckpointReader) -> Iterator[TensorSource]:
    p = _prefix(reader, "embed_tokens.weight", ("model.decoder.", "decoder."))
    h, e = spec.hidden_size, spec.embed_dim
    yield TensorSource("embed.weight", f"{p}embed_tokens.weight", (spec.vocab_size, e))
    yield TensorSource("positions.weight", f"{p}embed_positions.weight",
                       (spec.max_positions + spec.position_offset, h), skip_rows=spec.position_offset)
    if e != h:
        yield TensorSource("project_in.weight", f"{p}project_in.weight", (h, e))
        yield TensorSource("project_out.weight", f"{p}project_out.weight", (e, h))
    for i in range(spec.num_layers):
        src, dst = f"{p}layers.{i}", f"layers.{i}"
        yield from _norm(spec, f"{dst}.attn_norm", f"{src}.self_attn_layer_norm", h)
        attn = f"{src}.self_attn"
        yield from _fused_qkv(spec, dst, (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), f"{attn}.out_proj")
        yield from _norm(spec, f"{dst}.mlp_norm", f"{src}.final_layer_norm", h)
        yield from _linear(f"{dst}.mlp.up", f"{src}.fc1", spec.intermediate_size, h, spec.mlp_bias)
        yield from _linear(f"{dst}.mlp.down", f"{src}.fc2", h, spec.intermediate_size, spec.mlp_bias)
    if spec.final_norm:
        yield from _norm(spec, "norm", f"{p}final_layer_norm", h)
    if not spec.tie_word_embeddings:
        yield TensorSource("lm_head.weight", "lm_head.weight", (spec.vocab_size, e))


def _phi(spec: ModelSpec, reader: CheckpointReader) -> Iterator[TensorSource]:
    p = _prefix(reader, "embed_tokens.weight", ("model.", ""))
    h = spec.hidden_size
    yield TensorSource("embed.weight", f"{p}embed_tokens.weight", (spec.vocab_size, h))
    for i in range(spec.num_layers):
        src, dst = f"{p}layers.{i}", f"layers.{i}"
        yield from _norm(spec, f"{dst}.attn_norm", f"{src}.input_layernorm", h)
        attn = f"{src}.self_attn"
        yield from _fused_qkv(spec, dst, (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), f"{attn}.dense")
        yield from _linear(f"{dst}.mlp.up", f"{src}.mlp.fc1", spec.intermediate_size, h, spec.mlp_bias)
        yield from _linear(f"{dst}.mlp.down", f"{src}.mlp.fc2", h, spec.intermediate_size, spec.mlp_bias)
    yield from _norm(spec, "norm", f"{p}final_layernorm", h)
    if not spec.tie_word_embeddings:
        yield from _linear("lm_head", "lm_head", spec.vocab_size, h, spec.lm_head_bias)


def _llama(spec: ModelSpec, reader: CheckpointReader) -> Iterator[TensorSource]:
    p = _prefix(reader, "embed_tokens.weight", ("model.", ""))
    h, inner = spec.hidden_size, spec.intermediate_size
    yield TensorSource("embed.weight", f"{p}embed_tokens.weight", (spec.vocab_size, h))
    for i in range(spec.num_layers):
        src, dst = f"{p}layers.{i}", f"layers.{i}"
        yield from _norm(spec, f"{dst}.attn_norm", f"{src}.input_layernorm", h)
        attn = f"{src}.self_attn"
        yield from _fused_qkv(spec, dst, (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), f"{attn}.o_proj")
        yield from _norm(spec, f"{dst}.mlp_norm", f"{src}.post_attention_layernorm", h)
        # gate and up share one matrix: rows [0, inner) gate, [inner, 2 inner) up
        yield from _linear(f"{dst}.mlp.up", f"{src}.mlp.gate_proj", inner, h, spec.mlp_bias, rows=(0, inner))
        yield from _linear(f"{dst}.mlp.up", f"{src}.mlp.up_proj", inner, h, spec.mlp_bias, rows=(inner, 2 * inner))
        yield from _linear(f"{dst}.mlp.down", f"{src}.mlp.down_proj", h, inner, spec.mlp_bias)
    yield from _norm(spec, "norm", f"{p}norm", h)
    if not spec.tie_word_embeddings:
        yield TensorSource("lm_head.weight", "lm_head.weight", (spec.vocab_size, h))


_PLANS = {"gpt2": _gpt2, "opt": _opt, "phi": _phi, "llama": _llama, "mistral": _llama}


def checkpoint_plan(spec: ModelSpec, reader: CheckpointReader) -> list[TensorSource]:
    """Every tensor to read, in checkpoint order of layers, and where it goes."""
    return list(_PLANS[spec.model_type](spec, reader))
