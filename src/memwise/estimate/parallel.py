"""Per-device peak of a training step split over N devices.

W, G, S, X = one device's weights, gradients, optimizer states, optimizer step temporaries (from
memwise.estimate.finetune), A = activations, O = framework overhead, D = DIST_BYTES (torch.distributed
and gloo loaded, measured). ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models") partitions the model states of data parallelism:

    dp     W + G + S + X + A + O + D + G      DDP keeps its gradient buckets, a flat copy of G
    zero1  W + G + (S + X)/N + A + O + D      optimizer states sharded
    zero2  W + W/N + (G + S + X)/N + A + O + D + U_g + R2   + gradients sharded; U_g = one unit's full
                                                  gradient before its reduce-scatter; W/N: FSDP's
                                                  SHARD_GRAD_OP keeps the sharded flat parameters beside
                                                  the gathered ones (DeepSpeed's stage 2 would not)
    zero3  (W + G + S + X)/N + A + O + D + U_w + U_g + R3   + parameters sharded; U_w = the gathered units:
                                                  the root (embeddings, final norm, lm_head) + two layers
                                                  (current and prefetched), as FSDP wraps per block

R2, R3 = glibc heap retention of FSDP's per-unit buffers (CPU, default allocator). glibc's malloc serves
a request from mmap when it is at least M_MMAP_THRESHOLD, 128 KiB at start; the threshold is dynamic:
freeing an mmapped block larger than it and at most DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit)
raises it to that block's size (mallopt(3)). FSDP frees each unit's whole flat parameter after
sharding it at wrap time, so with a layer unit of u_w = W * layer/P bytes <= 32 MiB every later buffer
of that size (the gathered parameters, the unsharded gradient u_g = G * layer/T) comes from the heap,
which returns memory only from its top. Measured on gpt2 (u = 27 MiB, 2 gloo ranks, per-phase heap
from benchmarks/finetune_probe_dist.py): the heap grows for the first 4 steps and then stays, about
1.2 GiB of free heap at the peak; a freed unit buffer's region is refilled by activations and sharded
gradients before a buffer of that size comes again, so the next one takes a new region. Modeled as
three unit-sized regions per layer unit (a count, not a fit):
    R3 = L * (2 u_w + u_g)   FULL_SHARD: the forward gather, the backward gather, the gradient; the
                             live U_w layers lie inside these regions (not added again)
    R2 = L * (u_w + u_g)     SHARD_GRAD_OP: this step's gathers are live at the peak (in W); the
                             previous step's gather region and the gradient's come on top
Measured on gpt2 after 8 steps the retention is larger (about 1.2 GiB for FULL_SHARD against
R3 = 0.95 GiB) while the rest of the zero3 formula over-counts by about 0.25 GiB (a run with
MALLOC_MMAP_THRESHOLD_=1048576 peaks at 2.1 GiB against 2.4 without R3), so the sum is within 5% on
gpt2 (8 steps) but the parts are not each right: docs/estimate-finetune.md.
Units over 32 MiB (gpt2-medium, opt-350m: 48 MiB) are mmapped and unmapped on free: R = 0. With
MALLOC_MMAP_THRESHOLD_ set, the threshold is fixed and R = 0 too (not modeled: the estimate predicts
the default allocator). DDP's 25 MiB gradient buckets live for the whole run: no such term.

Megatron-LM (Shoeybi et al. 2019; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"):

    tp     column/row-parallel linears and the vocab-parallel embedding split t ways, norms and
           position tables replicated: model states * (r + (1 - r)/t), r = replicated share of parameters.
           Activations: per layer the norms' inputs and outputs (4 e h per token) stay whole, the rest / t;
           logits / t (vocab-parallel cross entropy).
    pp     ceil(L/p) layers per stage; the first stage also holds the embeddings, the last the final
           norm and lm_head (a tied embedding is held by both). 1F1B keeps p micro-batches in flight on the
           first stage: p * (L/p layers) = the whole model's layer activations of one micro-batch
           (batch_size is the micro-batch); logits only on the last stage. Peak = the larger stage.
    tpAxdpB  tp within groups of A devices, plain DDP across B groups (A * B = devices).
"""
from __future__ import annotations

import math
import re
from dataclasses import replace

from memwise.errors import MemwiseError, UnsupportedError
from memwise.spec import ModelSpec

MiB = 1 << 20
DIST_BYTES = 4 * MiB    # measured: tiny DDP rank peak minus the one-process peak of the same step
MMAP_THRESHOLD_MAX = 32 * MiB  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: 4 MiB * sizeof(long)
STRATEGIES = ("dp", "zero1", "zero2", "zero3", "tp", "pp", "tpAxdpB")


def parse_strategy(strategy: str, devices: int) -> tuple[str, int, int]:
    """(kind, tp degree, dp degree)."""
    if not isinstance(strategy, str):
        raise UnsupportedError(f"unknown parallel strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    hybrid = re.fullmatch(r"tp(\d+)xdp(\d+)", strategy)
    if hybrid:
        t, d = int(hybrid.group(1)), int(hybrid.group(2))
        if t < 1 or d < 1 or t * d != devices:
            raise MemwiseError(f"strategy {strategy}: tp x dp = {t * d} should equal devices = {devices}")
        return "tpxdp", t, d
    if strategy not in STRATEGIES[:-1]:
        raise UnsupportedError(f"unknown parallel strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    return strategy, devices if strategy == "tp" else 1, devices


def check_parallel(spec: ModelSpec, devices: int, strategy: str) -> None:
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise MemwiseError(f"devices should be a positive integer, found {devices!r}")
    kind, t, _ = parse_strategy(strategy, devices)
    if t > 1:
        kv = spec.num_kv_heads or spec.num_heads
        if spec.num_heads % t or kv % t:
            raise MemwiseError(f"tensor parallelism over {t} devices needs the heads ({spec.num_heads}, "
                               f"{kv} key/value) divisible by {t}")
    if kind == "pp" and devices > spec.num_layers:
        raise MemwiseError(f"pipeline parallelism over {devices} devices needs at least as many layers "
                           f"(model has {spec.num_layers})")


def layer_linears(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """(module name, rows, cols) of every layer matrix as the checkpoint stores it."""
    from memwise.models.decoder.layout import checkpoint_plan

    one = checkpoint_plan(replace(spec, num_layers=1))
    return [(t.name.split(".")[-2], t.shape[0], t.shape[1]) for t in one
            if t.name.endswith(".weight") and len(t.shape) == 2 and ".0." in t.name]


def _shares(spec: ModelSpec) -> dict[str, int]:
    from memwise.models import family_for

    family = family_for(spec.model_type, spec.source or "model")
    total = family.parameter_count(spec)
    layer = family.parameter_count(replace(spec, num_layers=1)) - family.parameter_count(replace(spec, num_layers=0))
    embed = spec.vocab_size * (spec.embed_dim or spec.hidden_size)
    return {"total": total, "layer": layer, "embed": embed, "root": total - spec.num_layers * layer}


def per_device_parts(spec: ModelSpec, parts: dict[str, int], acts: dict[str, int], devices: int, strategy: str,
                     method: str, e: int, tokens: int) -> tuple[int, list[str]]:
    """(bytes on each device, notes); e = compute dtype bytes, tokens = batch * seq_len."""
    kind, t, d = parse_strategy(strategy, devices)
    shares = _shares(spec)
    W, G, S, X = parts["weights"], parts["gradients"], parts["optimizer_states"], parts["optimizer_step_temporaries"]
    A, O = parts["activations"], parts["framework_overhead"] + DIST_BYTES
    notes = [f"{strategy} over {devices} devices: per-device peak (formulas in memwise.estimate.parallel)"]
    if kind == "pp":
        return _pipeline(spec, parts, acts, devices, shares, method) + O, notes
    if kind in ("tp", "tpxdp"):
        W, G, S, X, A = _tensor_parallel(spec, parts, acts, t, shares, method, e, tokens)
        if kind == "tp":
            return W + G + S + X + A + O, notes
        return W + 2 * G + S + X + A + O, notes  # DDP buckets across the dp groups
    n = d
    unit_w = W * shares["layer"] / shares["total"]
    unit_g = G * (shares["layer"] if method != "full" else max(shares["layer"], shares["embed"])) / shares["total"]
    if kind == "dp":
        return W + 2 * G + S + X + A + O, notes
    if kind == "zero1":
        return W + G + (S + X) // n + A + O, notes
    layer_g = G * shares["layer"] / shares["total"] if method == "full" else G / spec.num_layers
    retained = heap_retention(kind, unit_w, layer_g, spec.num_layers)
    if retained:
        notes.append(f"{kind}: glibc keeps FSDP's per-unit buffers (<= 32 MiB) in its heap: "
                     f"+{retained / MiB:.0f} MiB with the default allocator (memwise.estimate.parallel); "
                     "MALLOC_MMAP_THRESHOLD_=1048576 avoids it (not modeled)")
    if kind == "zero2":
        return int(W + W / n + (G + S + X) / n + unit_g + A + O + retained), notes
    root_w = W * shares["root"] / shares["total"]
    live_units = 0 if unit_w <= MMAP_THRESHOLD_MAX else 2 * unit_w  # small units: inside R3
    return int((W + G + S + X) / n + root_w + live_units + unit_g + A + O + retained), notes


def heap_retention(kind: str, unit_w: float, unit_g: float, layers: int) -> int:
    """Bytes glibc's heap holds for FSDP's per-unit buffers (R2, R3 in the module docstring): only the
    buffers at most glibc's 32 MiB dynamic mmap ceiling count; larger ones are mmapped and unmapped."""
    if kind not in ("zero2", "zero3"):
        return 0
    small_w = unit_w if unit_w <= MMAP_THRESHOLD_MAX else 0
    small_g = unit_g if unit_g <= MMAP_THRESHOLD_MAX else 0
    if kind == "zero2":
        return int(layers * (small_w + small_g))
    return int(layers * (2 * small_w + small_g))


def _tensor_parallel(spec: ModelSpec, parts: dict[str, int], acts: dict[str, int], t: int, shares: dict[str, int],
                     method: str, e: int, tokens: int) -> tuple[int, ...]:
    linear_and_embed = spec.num_layers * _layer_linear(spec) + shares["embed"]
    r = max(0.0, 1 - linear_and_embed / shares["total"])
    split = r + (1 - r) / t
    trainable_split = split if method == "full" else 1 / t
    replicated = min(acts["layers"], 4 * e * spec.hidden_size * spec.num_layers * tokens)
    layers = replicated + (acts["layers"] - replicated) / t
    A = layers + acts["logits"] / t + acts["other"] + acts.get("tied_embedding_gradient", 0) / t
    W = parts["weights"] * split
    G, S, X = (parts[k] * trainable_split for k in ("gradients", "optimizer_states", "optimizer_step_temporaries"))
    return int(W), int(G), int(S), int(X), int(A)


def _layer_linear(spec: ModelSpec) -> int:
    return sum(rows * cols for _, rows, cols in layer_linears(spec))


def _pipeline(spec: ModelSpec, parts: dict[str, int], acts: dict[str, int], p: int, shares: dict[str, int],
              method: str) -> int:
    per_stage_layers = math.ceil(spec.num_layers / p)
    layer_fraction = per_stage_layers * shares["layer"] / shares["total"]
    head = 0 if spec.tie_word_embeddings else shares["embed"]
    first = layer_fraction + shares["embed"] / shares["total"]
    last = layer_fraction + (shares["embed"] if spec.tie_word_embeddings else head) / shares["total"]
    states = parts["gradients"] + parts["optimizer_states"] + parts["optimizer_step_temporaries"]
    trainable = per_stage_layers / spec.num_layers if method != "full" else None
    first_bytes = parts["weights"] * first + states * (trainable or first) + acts["layers"] + acts["other"]
    last_layers = acts["layers"] * per_stage_layers / spec.num_layers
    last_bytes = parts["weights"] * last + states * (trainable or last) + last_layers + acts["logits"] + \
        acts.get("tied_embedding_gradient", 0)
    return int(max(first_bytes, last_bytes))
