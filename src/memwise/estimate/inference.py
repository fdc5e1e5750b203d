"""Predicted peak resident memory of one inference run (load, then generate), from the config alone.

The bench's peak (bench/cell.py) is max(load peak, generation peak) of the process's resident set.
The prediction is the sum of its parts, each a formula of the spec or a measured constant:

    framework_baseline     the interpreter, torch and the engine's code: a constant per engine and
                           model family, measured (docs/estimate.md says how)
    weights                the family's own figure (memory_gate.weights_bytes): dtype size, int8 scheme
                           or packed ternary; parameter_count x dtype size for transformers
    kv_cache / state       the spec-only twin of the model's cache_bytes(batch, prompt + new tokens)
    activations            the prefill's working set: hidden and MLP widths per token, attention scores
    logits_and_tokens      float32 logits of the last position, and the token buffer
    workspace              a measured constant: allocator arenas, thread pools, decode workspaces
    unpacked_matrices      memwise-reference only: ternary matrices unpacked to float32 per call
    load_transient_excess  what loading holds for a moment beyond all of the above, if anything
    checkpoint_mapped      a real checkpoint read through a memory map (transformers' safetensors,
                           torch .bin): its pages count in the resident set while mapped

On CUDA the baseline and the workspace are left out (the device holds no interpreter): the
prediction is then what the device holds, weights + cache + activations.+ logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from memwise.dtypes import parse_dtype
from memwise.errors import MemwiseError, UnsupportedError, shown
from memwise.estimate.breakdown import Estimate
from memwise.memory_gate import weights_bytes
from memwise.quantization import check_kv_scheme, check_scheme
from memwise.source import ModelSource, resolve_model
from memwise.spec import ModelSpec

ENGINES = ("memwise", "transformers", "memwise-reference")
DEVICES = ("cpu", "cuda")
MiB = 2**20

# Measured constants per (engine, family); docs/estimate.md says how they were measured.
#   baseline: the resident set after loading, less the weights: python, torch, the engine's code and
#             what loading leaves behind (bench cells of the tiny presets and the 370M presets)
#   workspace + workspace_per_weight x weights: what a generation adds beyond cache, activations and
#             logits (allocator arenas, thread pools, decode workspaces); the part that grows with the
#             model was fitted between the tiny presets and the 350M ones
@dataclass(frozen=True)
class EngineConstants:
    baseline: int
    workspace: int
    workspace_per_weight: float = 0.0


CONSTANTS = {
    # 232: 372 until the decoder's load stopped importing torch._dynamo and sympy (docs/quantization.md)
    ("memwise", "decoder"): EngineConstants(baseline=232 * MiB, workspace=1 * MiB, workspace_per_weight=0.01),
    ("memwise", "hgrn_bit"): EngineConstants(baseline=255 * MiB, workspace=1 * MiB),
    ("transformers", "decoder"): EngineConstants(baseline=450 * MiB, workspace=10 * MiB, workspace_per_weight=0.03),
}
# BitNet b1.58: memwise's baseline from the bitnet-b1.58-large cell of the peers suite (606 MiB peak,
# 2026-12-05); transformers runs it as a Llama, so the decoder's constants (not yet checked on bitnet).
CONSTANTS[("memwise", "bitnet")] = EngineConstants(baseline=263 * MiB, workspace=1 * MiB, workspace_per_weight=0.01)
CONSTANTS[("transformers", "bitnet")] = CONSTANTS[("transformers", "decoder")]
# Activations live per token of the prefill: the residual stream, the normed input, q/k/v and the
# attention output (hidden-sized) and the MLP's intermediate before and after its activation.
HIDDEN_COPIES = 6
INTERMEDIATE_COPIES = 2


class EstimateError(MemwiseError):
    """An estimate asked for with inputs that do not describe a run (engine, sizes, device)."""


def estimate_inference(model: str | Path | ModelSource, *, batch_size: int = 1, prompt_tokens: int = 128,
                       new_tokens: int = 128, dtype: str = "float32", quantize: str | None = None,
                       engine: str = "memwise", device: str = "cpu", max_memory: int | None = None,
                       kv_cache: str | None = None) -> Estimate:
    """Predicted peak memory of loading `model` and generating `new_tokens` after `prompt_tokens` for
    `batch_size` sequences (no weights are read). With max_memory (bytes: an offloaded load, memwise
    engine, decoder family) the weights are what the offload plan keeps resident plus its buffers."""
    resolved = model if isinstance(model, ModelSource) else resolve_model(model)
    spec, family = resolved.spec, resolved.family
    family_name = family.__name__.rsplit(".", 1)[-1]
    _check_numbers(batch_size=batch_size, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    engine, device_type = _check_engine(engine, device, family_name, quantize)
    torch_dtype = parse_dtype(dtype)
    if family_name == "hgrn_bit" and torch_dtype is not torch.float32:
        raise UnsupportedError(f"hgrn_bit computes in float32 (its weights are 2-bit ternary codes); dtype "
                               f"{str(torch_dtype).removeprefix('torch.')} is not supported")
    quantize = check_scheme(quantize, spec.model_type)
    kv_cache = check_kv_scheme(kv_cache, spec.model_type)
    if kv_cache is not None and engine != "memwise":
        raise UnsupportedError(f"kv_cache={kv_cache!r} is a scheme of engine memwise; engine {engine} keeps a float cache")
    length = prompt_tokens + new_tokens
    constants = CONSTANTS[("transformers" if engine == "transformers" else "memwise", family_name)]
    parts: dict[str, int] = {}
    if device_type == "cpu":
        parts["framework_baseline"] = constants.baseline
    notes = []
    if max_memory is not None:
        parts["weights"] = _offloaded_weights(resolved, engine, torch_dtype, quantize, max_memory, notes)
    elif engine != "transformers":
        parts["weights"] = weights_bytes(family, spec, torch_dtype, quantize)
    else:
        parts["weights"] = int(family.parameter_count(spec)) * torch_dtype.itemsize
    cache_name = "state" if family_name == "hgrn_bit" else "kv_cache"
    parts[cache_name] = spec_cache_bytes(spec, batch_size, length, torch_dtype, kv_cache)
    parts["activations"] = activation_bytes(spec, batch_size, prompt_tokens, length, torch_dtype, device_type)
    parts["logits_and_tokens"] = logits_bytes(spec, batch_size) + batch_size * length * 9
    if device_type == "cpu":
        parts["workspace"] = constants.workspace + int(constants.workspace_per_weight * parts["weights"])
    if engine == "memwise-reference":
        parts["unpacked_matrices"] = reference_unpack_bytes(spec)
    # The peak is the larger of the load's and the generation's: what loading holds beyond the
    # generation's parts is a part of its own, so that the parts still add up to the peak.
    generation = sum(v for k, v in parts.items() if k not in ("framework_baseline", "weights"))
    parts["load_transient_excess"] = max(load_transient_bytes(spec, engine, torch_dtype, quantize) - generation, 0)
    if resolved.directory is not None and device_type == "cpu":
        mapped = mapped_checkpoint_bytes(resolved.directory, engine)
        if mapped:
            parts["checkpoint_mapped"] = mapped
            notes.append("checkpoint_mapped: the checkpoint is memory-mapped while loading; its pages count "
                         "in the resident set until it is closed (not calibrated on real checkpoints)")
    if spec.positions == "learned" and length > spec.max_positions:
        notes.append(f"prompt + new tokens ({length}) exceed the model's {spec.max_positions} learned "
                     "positions: the run would be refused")
    settings = {"model": str(spec.source or model), "model_type": spec.model_type, "engine": engine,
                "device": device_type, "dtype": str(torch_dtype).removeprefix("torch."), "quantize": quantize,
                "kv_cache": kv_cache, "batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    return Estimate("inference", settings, parts, notes=notes)


def _offloaded_weights(resolved: ModelSource, engine: str, dtype: torch.dtype, quantize: str | None,
                       max_memory: int, notes: list[str]) -> int:
    """Resident weights of an offloaded run: the non-layer weights, the resident layers, the buffers."""
    if engine != "memwise" or resolved.family.__name__ != "memwise.models.decoder":
        raise EstimateError("--max-memory (offloading) is estimated for the memwise engine on the decoder "
                            f"family, not {engine} on {resolved.spec.model_type}")
    from memwise.offload.decoder import budget_plan
    plan = budget_plan(resolved.spec, dtype, quantize, max_memory)
    notes.append(f"offloaded: {plan.describe()}")
    return plan.resident_bytes


def spec_cache_bytes(spec: ModelSpec, batch_size: int, max_length: int, dtype: torch.dtype,
                     kv_cache: str | None = None) -> int:
    """What the model's cache_bytes(batch_size, max_length) returns, from the spec alone: keys and
    values per layer at the model's dtype or in the kv_cache scheme's layout, plus the cache's mask and
    positions; or a float32 recurrent state of constant size."""
    if spec.model_type == "hgrn_bit":
        return spec.num_layers * batch_size * spec.hidden_size * spec.expand_ratio * 4
    from memwise.models.decoder.cache import decoder_cache_bytes

    return decoder_cache_bytes(spec, batch_size, max_length, dtype, kv_cache)


def activation_bytes(spec: ModelSpec, batch_size: int, prompt_tokens: int, length: int, dtype: torch.dtype,
                     device_type: str = "cpu") -> int:
    """The prefill's working set: one layer's activations for the tokens in flight, and for attention
    the float32 scores of the prompt against the cache. hgrn_bit runs a CPU prefill in slices of a
    fixed token count (modules.PREFILL_SLICE_BYTES) and computes in float32, and its freed slices stay
    in the heap (memwise.heap), so its measured working set is twice one slice's activations."""
    widths = HIDDEN_COPIES * spec.hidden_size * max(spec.expand_ratio, 1) + INTERMEDIATE_COPIES * spec.intermediate_size
    if spec.model_type == "hgrn_bit":
        return 2 * prefill_tokens_in_flight(spec, batch_size, prompt_tokens, device_type) * widths * 4
    activations = batch_size * prompt_tokens * widths * dtype.itemsize
    activations += batch_size * spec.num_heads * prompt_tokens * length * 4
    return int(activations)


def prefill_tokens_in_flight(spec: ModelSpec, batch_size: int, prompt_tokens: int, device_type: str) -> int:
    """batch x positions of one prefill slice of hgrn_bit (its modules' slicing, redone from the spec)."""
    if device_type != "cpu":
        return batch_size * prompt_tokens
    from memwise.models.hgrn_bit.modules import PREFILL_SLICE_BYTES

    slice_tokens = max(1, PREFILL_SLICE_BYTES // (8 * spec.intermediate_size))
    most = max(1, slice_tokens // batch_size)
    if prompt_tokens <= most:
        return batch_size * prompt_tokens
    count = -(-prompt_tokens // most)
    return batch_size * -(-prompt_tokens // count)


def logits_bytes(spec: ModelSpec, batch_size: int) -> int:
    """float32 logits of the last position only (both engines compute no more at the prefill) and
    the copy that sampling or greedy selection works on."""
    return batch_size * 2 * spec.vocab_size * 4


def reference_unpack_bytes(spec: ModelSpec) -> int:
    """memwise-reference unpacks each ternary matrix to float32 on every call; the largest is the
    lm_head (V x H), and its codes' integer intermediates are as large again: measured +221 to +261 MiB
    over the loaded set for mmfree-370m at prompts of 1 to 512 tokens, against 2 x 125 MiB here."""
    return 2 * spec.vocab_size * spec.hidden_size * 4


QUANTIZE_TEMPORARIES = 4   # float32 copies while a matrix is quantized: its source + 3 temporaries of one row chunk


def load_transient_bytes(spec: ModelSpec, engine: str, dtype: torch.dtype, quantize: str | None = None) -> int:
    """What loading holds for a moment beyond the loaded weights: transformers builds a separate output
    embedding before tying it to the input one (one vocabulary x embedding table: measured on gpt2 and
    opt, both tied); memwise streams tensor by tensor (a tensor at a time, freed before the next), and a
    quantized load holds the float32 matrix and its quantizer's temporaries (abs, the scaled copy, its
    rounding) while the model is nearly whole: the VmHWM of a gpt2-medium int8 load rose 32-52 MiB above
    the resident set at each 16 MiB matrix (2026-12-05), and the bench cells' load peaks lie 35-106 MiB
    above their resident set after loading (docs/estimate.md)."""
    if engine == "memwise" and quantize is not None and spec.model_type != "hgrn_bit":
        from memwise.estimate.parallel import layer_linears
        from memwise.models.decoder.quantized import CHUNK_WEIGHTS

        # the whole float32 source matrix, and the quantizer's temporaries on one chunk of its rows
        largest = max(rows * cols for _, rows, cols in layer_linears(spec))
        return (largest + (QUANTIZE_TEMPORARIES - 1) * min(CHUNK_WEIGHTS, largest)) * 4
    if engine != "transformers" or not spec.tie_word_embeddings:
        return 0
    return spec.vocab_size * (spec.embed_dim or spec.hidden_size) * dtype.itemsize


def mapped_checkpoint_bytes(directory: Path, engine: str) -> int:
    """Bytes of the checkpoint the engine maps into memory while loading: transformers maps safetensors
    and .bin files; memwise reads safetensors tensor by tensor (nothing mapped) and maps .bin files."""
    suffixes = (".safetensors", ".bin") if engine == "transformers" else (".bin",)
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.suffix in suffixes and p.is_file())


def _check_numbers(**values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"{name} should be a positive integer, found {shown(value)}")


def _check_engine(engine: object, device: object, family_name: str, quantize: str | None) -> tuple[str, str]:
    if engine not in ENGINES:
        raise EstimateError(f"unknown engine {shown(engine)} (known: {', '.join(ENGINES)})")
    device_type = str(device).split(":", 1)[0]
    if device_type not in DEVICES:
        raise EstimateError(f"unknown device {shown(device)} (use cpu, cuda or cuda:N)")
    if engine == "transformers" and family_name == "hgrn_bit":
        raise UnsupportedError("engine transformers cannot run hgrn_bit models (its package is GPU-only); "
                               "use engine memwise")
    if engine == "memwise-reference" and family_name != "hgrn_bit":
        raise UnsupportedError("engine memwise-reference runs MatMul-free (hgrn_bit) models only")
    if engine != "memwise" and quantize is not None:
        raise UnsupportedError(f"quantize={quantize!r} is a scheme of engine memwise; engine {engine} runs float or ternary weights")
    if quantize is not None and device_type != "cpu":
        raise UnsupportedError(f"quantize={quantize!r} runs on the CPU for now (device {device!r} requested)")
    return str(engine), device_type
