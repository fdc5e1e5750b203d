from __future__ import annotations
from dataclasses import dataclass, field

@dataclass
class Estimate:
    task: str                      # "inference" | "finetune"
    settings: dict[str, object]    # the inputs that produced it
    parts: dict[str, int]          # component name -> bytes
    per_device: int | None = None  # for multi-device: bytes on each device
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_peak_bytes(self) -> int:
        return self.per_device if self.per_device is not None else sum(self.parts.values())

    def to_json(self) -> dict:
        return {"task": self.task, "settings": self.settings, "predicted_peak_bytes": self.predicted_peak_bytes,
                "breakdown": dict(self.parts), "per_device_bytes": self.per_device, "notes": list(self.notes)}
