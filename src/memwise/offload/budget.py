"""The memory budget of an offloaded run: parsing it, and splitting it between resident layers,
read-ahead buffers and the run's workspace.

What the budget must hold: the weights outside the layers (embeddings, final norm, lm_head: always
resident), the workspace (KV cache and activations of a WORKSPACE_TOKENS-token, batch-1 run, and its
logits), and at least one layer buffer. Two buffers let the next layer be read while one computes;
what is left keeps whole layers resident, which saves their reads entirely (a third buffer would
only deepen the read-ahead of a run that is already bound by the disk).
"""
from __future__ import annotations

from dataclasses import dataclass

from memwise.offload.store import OffloadError
from memwise import sizes

WORKSPACE_TOKENS = 512


def parse_size(text: str | int, what: str = "max_memory") -> int:
    """'2GiB', '512MiB', '2GB', '1.5G', 2147483648 -> bytes (memwise.sizes)."""
    return sizes.parse_size(text, what, OffloadError)


def format_size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@dataclass(frozen=True)
class BudgetPlan:
    budget: int
    fixed: int          # weights outside the layers
    workspace: int
    layer: int          # one layer's region
    num_layers: int
    resident: int       # layers kept in memory
    buffers: int        # read-ahead buffers for the streamed layers

    @property
    def streamed(self) -> int:
        return self.num_layers - self.resident

    @property
    def resident_bytes(self) -> int:
        """Weights and buffers the run holds (the workspace not included)."""
        return self.fixed + (self.resident + self.buffers) * self.layer

    def describe(self) -> str:
        return (f"{self.resident} of {self.num_layers} layers resident, {self.streamed} streamed through "
                f"{self.buffers} buffer(s) of {format_size(self.layer)}; non-layer weights {format_size(self.fixed)}, "
                f"workspace {format_size(self.workspace)}, budget {format_size(self.budget)}")


def minimum_budget(fixed: int, layer: int, workspace: int) -> int:
    return fixed + layer + workspace


def plan_budget(budget: int, fixed: int, layer: int, workspace: int, num_layers: int, source: str) -> BudgetPlan:
    """How `budget` bytes are spent; OffloadError when it cannot hold one layer and the rest."""
    least = minimum_budget(fixed, layer, workspace)
    if budget < least:
        raise OffloadError(f"max_memory {format_size(budget)} is below what {source} needs to stream: "
                           f"{format_size(least)} (one layer {format_size(layer)} + non-layer weights "
                           f"{format_size(fixed)} + workspace {format_size(workspace)})")
    spare = budget - fixed - workspace
    if spare >= num_layers * layer:
        return BudgetPlan(budget, fixed, workspace, layer, num_layers, num_layers, 0)
    buffers = 2 if spare >= 2 * layer else 1
    resident = min((spare - buffers * layer) // layer, num_layers - 1)
    return BudgetPlan(budget, fixed, workspace, layer, num_layers, int(resident), buffers)
