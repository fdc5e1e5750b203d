"""The offload policy: which decoder layers keep their weights in memory and which stream from disk,
where the KV cache lives, and the batch and micro-batch counts, chosen by a mixed-integer linear
program over a cost model (memwise.offload.costs), as FlexGen does one tier down (memory and disk).

The schedule is FlexGen's block schedule. A block of B sequences is split into m micro-batches of
s = B / m sequences; each layer, once its weights are in memory, serves all m micro-batches before
the next layer is read, so one read of a streamed layer is shared by B sequences. An I/O thread
reads streamed layers (and disk-resident KV) ahead into two buffers while the current layer
computes, so reading and computing overlap: a step takes about the longer of the two, not their sum
(streamed layers are spread through the pass, memwise.offload.stream.spread_resident, so that each
read has resident layers' compute to hide behind). The overlap is not free on a CPU: the I/O thread
shares the cores and memory with the products, which the two overlap figures below account for.

Figures of the model (scheme S: float32 or a quantization scheme):
    L layers; W bytes of one layer's weights in S; E bytes of everything else (embeddings, lm_head,
    norms), always resident; H the lm_head's bytes; P prompt tokens, N new tokens;
    k = 2 x kv_heads x head_dim x 4 bytes of KV cache per sequence, token and layer (float32).
    K  = B (P + N) k        one layer's KV cache at full length
    Kb = s (P + N) k        one micro-batch's share of it (the unit the I/O thread moves)
    Kd = B (P + N/2) k + B k    bytes of one layer's KV a decode step reads (mean length) and writes
    Kp = B P k              bytes of one layer's KV the prefill writes
Rates of this machine: R_disk (O_DIRECT read while the products run; the plain read figure where
that was not measured), f (the products' speed beside reads, a fraction of their speed alone),
a and R_kv (a decode step's attention: seconds per sequence and head, and the KV cache bytes/s
it reads; 0 and the memory read figure where not measured), g_S (weight bytes/s of a batch-1
product), g8_S (the same at 8 rows, the decode kernels' limit), G_S (at b0 = costs.gemm_batch = 32),
G'_S (at b1 = costs.prefill_batch = 256). One layer's product over t tokens takes c_S(t), the
piecewise linear function of t through the measured times (1, W / g_S), (8, W / g8_S), (b0, W / G_S),
(b1, W / G'_S), and c_S(b1) t / b1 beyond: memory-bound at small t, compute-bound at large t.

Decision variables (integers r, q in [0, L], binaries y, z; times Tp, Td >= 0):
    r resident layers (L - r stream), q layers whose KV cache lives on disk (L - q in memory),
    y = 1 when any layer streams, z = 1 when any KV is on disk (their double buffers then exist).

Times (seconds), with Dd = ((L - r) W + q Kd) / R_disk and Dp = ((L - r) W + q Kp) / R_disk the
decode step's and the prefill's reads:
    Cd = L m c_S(s) + m c_H(s) + L (B heads a + Kd / R_kv)             decode step: compute
    Cp = L m c_S(s P) + m c_H(s) + 4 B P^2 hidden L / F32              prefill: compute (F32: float
                                                                       FLOP/s from G'_float32)
    Td >= Dd,  Td >= Cd + (1 - f) Dd                                   a step ends with its reads, or
    Tp >= Dp,  Tp >= Cp + (1 - f) Dp                                   with its products slowed by them
Memory (bytes; the budget counts what memwise allocates, not the interpreter's own base):
    E + r W (1 + w) + 2 W y + (L - q) K + 2 Kb z + A(s) + X(B) + O <= budget
    with w the measured allocator workspace per weight byte, A(s) one micro-batch's prefill
    activations (memwise.estimate's formula), X(B) the hidden states of all micro-batches between
    layers (B P hidden x 4, twice), O logits, tokens and the fixed workspace.
Links: r + L y >= L (a streamed layer needs the buffers), q <= L z.

Objective: minimise Tp + (N - 1) Td (the prefill yields the first token), i.e. maximise throughput =
B N / (Tp + (N - 1) Td) generated tokens/s at this (B, m); among equal times, a second solve
minimises the bytes read from disk (so everything stays resident when the budget allows). B ranges
over the candidate batch sizes and m over their power-of-two divisors, as FlexGen enumerates its
batch sizes around the LP; the best throughput wins.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from memwise.errors import MemwiseError, UnsupportedError, shown
from memwise.offload.costs import Costs

# The planned runtime imports scipy.optimize (milp) before its budgeted memory: 38 MiB of resident
# set on the EPYC VM (benchmarks/offload_stream.py measures its base after that import)
SOLVER_IMPORT_BYTES = 38 << 20
TIE = 1e-7              # relative slack on the optimal time when the second solve minimises disk bytes
STREAM_BUFFERS = 2      # double buffering: the layer computing and the one being read
KV_BUFFERS = 2


class PlanError(MemwiseError):
    """No policy fits: a budget below the minimum, or inputs that describe no run."""


@dataclass(frozen=True)
class ModelFigures:
    """What the planner needs of a model in one scheme (bytes; no weights are read)."""
    name: str
    scheme: str                 # float32, int8, int4 or nf4: the kernel that multiplies the layers
    layers: int
    layer_bytes: int            # W
    other_bytes: int            # E
    head_bytes: int             # H
    hidden_size: int
    heads: int                  # attention heads (queries) per layer
    kv_bytes_per_token: int     # k: one sequence, one token, one layer
    workspace: int
    workspace_per_weight: float
    runtime_base: int
    spec: Any = field(repr=False, default=None)


@dataclass(frozen=True)
class Policy:
    """The chosen schedule; the streaming runtime reads resident_layers, kv_placement, batch_size and
    micro_batches. Times and rates are predictions of the cost model."""
    model: str
    scheme: str
    budget_bytes: int
    layers: int
    resident_layers: int
    streamed_layers: int
    kv_placement: str           # "memory", "disk", or "split" (kv_disk_layers of the layers on disk)
    kv_disk_layers: int
    batch_size: int
    micro_batches: int
    prompt_tokens: int
    new_tokens: int
    predicted_tokens_per_s: float           # generated tokens / (prefill + decode) seconds
    predicted_decode_tokens_per_s: float
    predicted_prefill_s: float
    predicted_step_s: float
    decode_bound: str                       # "disk" or "compute": which side of the decode max binds
    predicted_peak_bytes: int               # runtime_base_bytes + budgeted_bytes
    budgeted_bytes: int
    runtime_base_bytes: int
    disk_bytes_per_token: float             # decode: bytes read from disk per generated token
    memory: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    policy: Policy
    candidates: list[dict[str, Any]]        # every (batch, micro_batches) tried: tokens/s or None
    minimum_budget_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy.to_json(), "candidates": self.candidates,
                "minimum_budget_bytes": self.minimum_budget_bytes}


def model_figures(model: Any, scheme: str | None = None, kv_cache: str | None = None) -> ModelFigures:
    """ModelFigures of a source (as memwise.load takes it) or a resolved ModelSource; `kv_cache` the
    KV cache's kv_quant scheme (None: float32)."""
    import torch
    from memwise.estimate.inference import CONSTANTS
    from memwise.memory_gate import weights_bytes
    from memwise.quantization import check_scheme
    from memwise.source import ModelSource, resolve_model

    resolved = model if isinstance(model, ModelSource) else resolve_model(model)
    spec, family = resolved.spec, resolved.family
    if family.__name__.rsplit(".", 1)[-1] != "decoder":
        raise UnsupportedError(f"{spec.source or resolved.where}: the offload planner covers conventional decoders "
                               f"(gpt2, opt, phi, llama, mistral), not {spec.model_type}")
    scheme = check_scheme(scheme, spec.model_type)
    sizes = [weights_bytes(family, replace(spec, num_layers=n), torch.float32, scheme) for n in (0, 1)]
    embed = spec.embed_dim or spec.hidden_size
    constants = CONSTANTS[("memwise", "decoder")]
    kv_vector = 4 * spec.head_dim
    if kv_cache is not None:
        from memwise.kernels import kv_quant
        kv_vector = kv_quant.bytes_per_vector(kv_cache, spec.head_dim)
    return ModelFigures(name=str(spec.source or resolved.where), scheme=scheme or "float32", layers=spec.num_layers,
                        layer_bytes=sizes[1] - sizes[0], other_bytes=sizes[0],
                        head_bytes=spec.vocab_size * embed * (1 if scheme else 4), hidden_size=spec.hidden_size,
                        heads=spec.num_heads,
                        kv_bytes_per_token=2 * spec.num_kv_heads * kv_vector, workspace=constants.workspace,
                        workspace_per_weight=constants.workspace_per_weight,
                        runtime_base=constants.baseline + SOLVER_IMPORT_BYTES, spec=spec)


def _product_s(costs: Costs, scheme: str, nbytes: float, tokens: int) -> float:
    """c_S(t): seconds of `tokens` tokens through `nbytes` of weights in `scheme`, piecewise linear
    through the measured points (1, b8, b0, b1 tokens; b8 where measured), proportional beyond the last."""
    rates = [(1, costs.gemv_bytes_per_s), (costs.few_rows_batch, costs.few_rows_bytes_per_s),
             (costs.gemm_batch, costs.gemm_bytes_per_s), (costs.prefill_batch, costs.prefill_gemm_bytes_per_s)]
    points: list[tuple[int, float]] = []
    for batch, rate in rates:
        if scheme in rate:      # noisy figures must not make more tokens cheaper
            points.append((batch, max(nbytes / rate[scheme], points[-1][1] if points else 0.0)))
    if tokens <= 1:
        return points[0][1]
    for (lo, at_lo), (hi, at_hi) in zip(points, points[1:]):
        if tokens <= hi:
            return at_lo + (tokens - lo) / (hi - lo) * (at_hi - at_lo)
    last, at_last = points[-1]
    return at_last * tokens / last


def _overlapped_s(costs: Costs, compute_s: float, disk_bytes: float) -> float:
    """Seconds of `compute_s` of products beside reads of `disk_bytes`: the reads run at the disk's
    busy figure R', the products at a fraction f of their speed while reads go on, so the step ends
    with the reads (D / R') or with the products (C + (1 - f) D / R'), whichever is later."""
    reads = disk_bytes / costs.overlapped_disk_bytes_per_s
    return max(reads, compute_s + (1 - costs.products_beside_reads) * reads)


@dataclass(frozen=True)
class _Case:
    """The constants of one (batch, micro-batches) MILP."""
    batch: int
    micro: int
    compute_decode: float
    compute_prefill: float
    kv_full: int
    kv_buffer: int
    kv_decode: int
    kv_prefill: int
    fixed: dict[str, int]

    def minimum(self, fig: ModelFigures) -> int:
        """Bytes of this case with every layer streamed and all of the KV cache on disk."""
        return sum(self.fixed.values()) + STREAM_BUFFERS * fig.layer_bytes + KV_BUFFERS * self.kv_buffer


def _case(fig: ModelFigures, costs: Costs, batch: int, micro: int, prompt: int, new: int) -> _Case:
    from memwise.estimate.inference import activation_bytes, logits_bytes
    import torch

    s, L, k = batch // micro, fig.layers, fig.kv_bytes_per_token
    head_scheme = "int8" if fig.scheme != "float32" else "float32"
    attention_flops = 4 * batch * prompt * prompt * fig.hidden_size * L
    float_flops = 2 * costs.prefill_batch * costs.prefill_gemm_bytes_per_s["float32"] / 4
    kv_decode = batch * (prompt + new // 2) * k + batch * k
    compute_decode = (L * micro * _product_s(costs, fig.scheme, fig.layer_bytes, s)
                      + micro * _product_s(costs, head_scheme, fig.head_bytes, s)
                      + L * (batch * fig.heads * costs.attention_s_per_head + kv_decode / costs.kv_read_bytes_per_s))
    compute_prefill = (L * micro * _product_s(costs, fig.scheme, fig.layer_bytes, s * prompt)
                       + micro * _product_s(costs, head_scheme, fig.head_bytes, s) + attention_flops / float_flops)
    fixed = {"other_weights": fig.other_bytes,
             "activations": activation_bytes(fig.spec, s, prompt, prompt + new, torch.float32),
             "hidden_states": 2 * batch * prompt * fig.hidden_size * 4,
             "logits_and_tokens": logits_bytes(fig.spec, batch) + batch * (prompt + new) * 9,
             "workspace": fig.workspace + int(fig.workspace_per_weight * fig.other_bytes)}
    return _Case(batch, micro, compute_decode, compute_prefill, kv_full=batch * (prompt + new) * k,
                 kv_buffer=s * (prompt + new) * k, kv_decode=kv_decode, kv_prefill=batch * prompt * k, fixed=fixed)


def _solve(fig: ModelFigures, costs: Costs, case: _Case, budget: int, new: int,
           kv_on_disk: bool = True) -> np.ndarray | None:
    """[r, q, y, z, Tp, Td] of the best policy of `case`, or None when nothing fits `budget`."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    L, W, R, slow = fig.layers, fig.layer_bytes, costs.overlapped_disk_bytes_per_s, 1 - costs.products_beside_reads
    rows = [  # coefficients of [r, q, y, z, Tp, Td], lower and upper bounds
        ([W / R, -case.kv_decode / R, 0, 0, 0, 1], L * W / R, np.inf),
        ([W / R, -case.kv_prefill / R, 0, 0, 1, 0], L * W / R, np.inf),
        ([slow * W / R, -slow * case.kv_decode / R, 0, 0, 0, 1], case.compute_decode + slow * L * W / R, np.inf),
        ([slow * W / R, -slow * case.kv_prefill / R, 0, 0, 1, 0], case.compute_prefill + slow * L * W / R, np.inf),
        ([W * (1 + fig.workspace_per_weight), -case.kv_full, STREAM_BUFFERS * W, KV_BUFFERS * case.kv_buffer, 0, 0],
         -np.inf, budget - sum(case.fixed.values()) - L * case.kv_full),
        ([1, 0, L, 0, 0, 0], L, np.inf),
        ([0, 1, 0, -L, 0, 0], -np.inf, 0),
    ]
    matrix = np.array([row for row, _, _ in rows], dtype=float)
    low, high = np.array([lo for _, lo, _ in rows]), np.array([hi for _, _, hi in rows])
    kv_disk = L if kv_on_disk else 0
    bounds = Bounds([0, 0, 0, 0, case.compute_prefill, case.compute_decode], [L, kv_disk, 1, 1, np.inf, np.inf])
    integrality = np.array([1, 1, 1, 1, 0, 0])
    time = np.array([0, 0, 0, 0, 1, new - 1], dtype=float)     # the prefill yields the first token
    first = milp(time, constraints=LinearConstraint(matrix, low, high), bounds=bounds, integrality=integrality)
    if first.status != 0 or first.x is None:
        return None
    # Second solve: no slower than the best, and the fewest bytes from disk (then the fewest buffers).
    best = float(time @ first.x)
    disk = np.array([-W * new, (case.kv_prefill + (new - 1) * case.kv_decode), 1e-3 * W, 1e-3 * W, 0, 0]) / R
    limit = LinearConstraint(time.reshape(1, -1), -np.inf, best * (1 + TIE) + 1e-12)
    second = milp(disk, constraints=[LinearConstraint(matrix, low, high), limit], bounds=bounds,
                  integrality=integrality)
    return second.x if second.status == 0 else first.x


def micro_batch_counts(batch: int) -> list[int]:
    """m in 1, 2, 4, ... dividing `batch` (and `batch` itself)."""
    counts = [m for m in (2**i for i in range(batch.bit_length())) if batch % m == 0]
    return sorted(set(counts + [batch]))


def plan(model: Any, budget: int, costs: Costs, *, scheme: str | None = None, batch_sizes: tuple[int, ...] = (1, 8, 32, 64),
         prompt_tokens: int = 128, new_tokens: int = 32, kv_cache: str | None = None, kv_on_disk: bool = True) -> Plan:
    """The fastest policy for `model` within `budget` bytes (beyond the runtime's own base).
    `kv_on_disk=False` keeps the KV cache in memory (the streaming runtime's placement)."""
    _check_inputs(budget, batch_sizes, prompt_tokens, new_tokens)
    costs.check()
    fig = model_figures(model, scheme, kv_cache)
    spec = fig.spec
    if spec.positions == "learned" and prompt_tokens + new_tokens > spec.max_positions:
        raise PlanError(f"prompt + new tokens ({prompt_tokens + new_tokens}) exceed {fig.name}'s "
                        f"{spec.max_positions} positions")
    best: Policy | None = None
    candidates, minimum = [], None
    for batch in sorted(set(batch_sizes)):
        for micro in micro_batch_counts(batch):
            case = _case(fig, costs, batch, micro, prompt_tokens, new_tokens)
            minimum = case.minimum(fig) if minimum is None else min(minimum, case.minimum(fig))
            x = _solve(fig, costs, case, budget, new_tokens, kv_on_disk)
            policy = None if x is None else _policy(fig, costs, case, x, budget, prompt_tokens, new_tokens)
            candidates.append({"batch_size": batch, "micro_batches": micro,
                               "predicted_tokens_per_s": policy and policy.predicted_tokens_per_s,
                               "predicted_peak_bytes": policy and policy.predicted_peak_bytes})
            if policy is not None and (best is None or _better(policy, best)):
                best = policy
    if best is None:
        if not kv_on_disk:
            kv = _case(fig, costs, min(batch_sizes), 1, prompt_tokens, new_tokens).kv_full * fig.layers
            raise PlanError(f"--max-memory {_mib(budget)}: {fig.name} ({fig.scheme}) at batch {min(batch_sizes)} does not "
                            f"fit with its KV cache ({_mib(kv)}) in memory and every layer streamed; use --kv-cache "
                            "int4, a smaller batch or a larger --max-memory")
        raise PlanError(f"--max-memory {_mib(budget)} is below the minimum of {_mib(minimum or 0)} that {fig.name} "
                        f"({fig.scheme}) needs: a batch of {min(batch_sizes)} with every layer streamed through "
                        f"{STREAM_BUFFERS} buffers of {_mib(fig.layer_bytes)} and its KV cache on disk")
    return Plan(best, candidates, int(minimum or 0))


def _better(a: Policy, b: Policy) -> bool:
    """Higher predicted throughput; within TIE of each other (a compute-bound model predicts the same
    rate for many batches), fewer disk bytes per token, then the larger batch, then fewer micro-batches."""
    if abs(a.predicted_tokens_per_s - b.predicted_tokens_per_s) > TIE * max(a.predicted_tokens_per_s,
                                                                             b.predicted_tokens_per_s):
        return a.predicted_tokens_per_s > b.predicted_tokens_per_s
    return (-a.disk_bytes_per_token, a.batch_size, -a.micro_batches) > (-b.disk_bytes_per_token, b.batch_size,
                                                                          -b.micro_batches)


def _policy(fig: ModelFigures, costs: Costs, case: _Case, x: Any, budget: int, prompt: int, new: int) -> Policy:
    r, q, y, z = (int(round(v)) for v in x[:4])
    L, W, R = fig.layers, fig.layer_bytes, costs.overlapped_disk_bytes_per_s
    prefill = _overlapped_s(costs, case.compute_prefill, (L - r) * W + q * case.kv_prefill)
    disk_step = (L - r) * W + q * case.kv_decode
    step = _overlapped_s(costs, case.compute_decode, disk_step)
    disk_bound = disk_step / R * costs.products_beside_reads > case.compute_decode    # reads end the step
    memory = dict(case.fixed)
    memory["resident_weights"] = r * W
    memory["stream_buffers"] = STREAM_BUFFERS * W * y
    memory["resident_workspace"] = int(fig.workspace_per_weight * r * W)
    memory["kv_cache"] = (L - q) * case.kv_full
    memory["kv_buffers"] = KV_BUFFERS * case.kv_buffer * z
    budgeted = sum(memory.values())
    return Policy(model=fig.name, scheme=fig.scheme, budget_bytes=budget, layers=L, resident_layers=r,
                  streamed_layers=L - r, kv_placement="memory" if q == 0 else "disk" if q == L else "split",
                  kv_disk_layers=q, batch_size=case.batch, micro_batches=case.micro, prompt_tokens=prompt,
                  new_tokens=new, predicted_tokens_per_s=case.batch * new / (prefill + (new - 1) * step),
                  predicted_decode_tokens_per_s=case.batch / step, predicted_prefill_s=prefill,
                  predicted_step_s=step, decode_bound="disk" if disk_bound else "compute",
                  predicted_peak_bytes=fig.runtime_base + budgeted, budgeted_bytes=budgeted,
                  runtime_base_bytes=fig.runtime_base, disk_bytes_per_token=disk_step / case.batch, memory=memory)


def _check_inputs(budget: object, batch_sizes: tuple[int, ...], prompt: object, new: object) -> None:
    for name, value in (("budget", budget), ("prompt_tokens", prompt), ("new_tokens", new)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} should be a positive integer, found {shown(value)}")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise PlanError(f"batch sizes should be positive integers, found {shown(batch_sizes)}")


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
