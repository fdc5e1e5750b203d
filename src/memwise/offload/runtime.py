"""The offloaded runtime's use of the plan (memwise.offload.plan): before a generation, the policy for its
batch, prompt and new tokens is solved and applied to the loaded model: the layers it keeps resident
(the stream rebuilt when that count changes) and its micro-batch size (the block schedule of
memwise.models.decoder.block_schedule). The KV cache stays in memory, in the model's kv_cache scheme:
the plan is solved with that placement, and a batch whose cache does not fit is refused with the
figures (offloading the KV cache to disk is not implemented).

Where the figures come from: MEMWISE_OFFLOAD_COSTS=FILE (a cost file, as `memwise plan --costs`), or
this machine's, cached (measured on first use, tens of seconds; `memwise plan --remeasure` refreshes
them). MEMWISE_OFFLOAD_PLAN=0 turns planning off: the load's budget split, the batch as one block.
"""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from memwise.offload.budget import BudgetPlan
from memwise.offload.plan import Plan, PlanError, Policy, plan
from memwise.offload.store import OffloadError, StoreHeader
from memwise.offload.stream import LayerStream, RegionReader, spread_resident


@dataclass(frozen=True)
class RunPlan:
    """What a generation of `batch_size` x (`prompt_tokens` + `new_tokens`) runs with."""
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    resident_layers: int
    micro_batch_size: int | None        # None: the batch is one block
    policy: Policy | None               # None: the load's budget split (see `reason`)
    reason: str | None = None

    @property
    def micro_batches(self) -> int:
        size = self.micro_batch_size or self.batch_size
        return -(-self.batch_size // size)


class PlannedRuntime:
    """Attached to an offloaded Decoder as `model.offload_runtime`; `prepare` is called by generation."""

    def __init__(self, model, path: Path, header: StoreHeader, budget: BudgetPlan, scheme: str | None, direct: bool):
        self._model = weakref.ref(model)     # the model holds this object: no cycle
        self.path, self.header, self.budget, self.scheme, self.direct = path, header, budget, scheme, direct
        self.resident = budget.resident
        self.last: RunPlan | None = None
        self.prepare_s = 0.0

    def prepare(self, batch: int, prompt: int, new: int) -> RunPlan:
        start = time.perf_counter()
        model = self._model()
        run = self.solve(batch, prompt, new, model.kv_cache)
        if run.resident_layers != self.resident:
            self._restream(model, run.resident_layers)
        model.micro_batch_size = run.micro_batch_size
        self.last = run
        self.prepare_s = time.perf_counter() - start     # solving (and re-reading resident layers) counts in a run
        return run

    def solve(self, batch: int, prompt: int, new: int, kv_cache: str | None) -> RunPlan:
        model = self._model()
        load_split = RunPlan(batch, prompt, new, self.budget.resident, None, None)
        if os.environ.get("MEMWISE_OFFLOAD_PLAN", "1") == "0":
            return _with_reason(load_split, "planning turned off (MEMWISE_OFFLOAD_PLAN=0)")
        costs = _costs()
        spec = model.spec
        options = dict(scheme=self.scheme, batch_sizes=(batch,), prompt_tokens=prompt, new_tokens=new, kv_cache=kv_cache)
        try:
            chosen: Plan = plan(spec.source, self.budget.budget, costs, kv_on_disk=False, **options)
        except PlanError as in_memory:
            try:
                plan(spec.source, self.budget.budget, costs, kv_on_disk=True, **options)
            except PlanError as e:
                # below the planner's own minimum (its workspace constants), which the load's split,
                # made for batch 1, can still hold: run that
                return _with_reason(load_split, str(e))
            raise OffloadError(str(in_memory)) from None
        policy = chosen.policy
        size = batch // policy.micro_batches
        return RunPlan(batch, prompt, new, policy.resident_layers, size if policy.micro_batches > 1 else None, policy)

    def _restream(self, model, resident: int) -> None:
        # Resident layers the new plan streams are unbound from their modules, so that they are freed
        # before the new stream reads the ones it adds (the budget holds one set, not two); the sets
        # are nested (spread_resident), so a plan one layer apart reads or drops one layer.
        old = model.layer_stream
        layers = spread_resident(len(self.header.layers), resident)
        kept = set(old.resident) & set(layers)
        old.bind_resident(model.layers, kept)
        old.release()
        model.offload_streams.remove(old)
        for index in set(old.resident) - kept:
            model.layers[index].to_empty(device="meta")
        del old
        reader = RegionReader(self.path, self.direct)
        streamed = len(self.header.layers) - resident
        model.layer_stream = LayerStream(reader, self.header.layers, self.header.layer_tensors, layers,
                                         2 if streamed else 0, kept=kept)
        model.offload_streams.append(model.layer_stream)     # closed with the model (decoder._open)
        self.resident = resident


def _with_reason(run: RunPlan, reason: str) -> RunPlan:
    return RunPlan(run.batch_size, run.prompt_tokens, run.new_tokens, run.resident_layers, None, None, reason)


def _costs():
    from memwise.offload.costs import load_costs
    from memwise.offload.probes import machine_costs
    given = os.environ.get("MEMWISE_OFFLOAD_COSTS")
    return load_costs(Path(given)) if given else machine_costs()
