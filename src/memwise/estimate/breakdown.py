"""What an estimate is: the parts of a predicted peak, by component, and the inputs that produced it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Estimate:
    task: str                      # "inference" | "finetune"
    settings: dict[str, object]    # the inputs that produced it (model, batch, dtype, ...)
    parts: dict[str, int]          # component name -> bytes (weights, kv_cache / state, activations,
                                   # workspace, gradients, optimizer_states, framework_overhead, ...)
    per_device: int | None = None  # for multi-device: bytes on each device
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_peak_bytes(self) -> int:
        """Bytes on each device for a multi-device estimate, else the parts added up."""
        if self.per_device is not None:
            return int(self.per_device)
        return int(sum(self.parts.values()))

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "settings": dict(self.settings),
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "breakdown": {name: int(size) for name, size in self.parts.items()},
            "per_device": self.per_device,
            "notes": list(self.notes),
        }
