"""Memory estimates: what a run will need at its peak, by component, before anything is loaded.

    estimate(model, task="inference", batch_size=..., prompt_tokens=..., new_tokens=..., dtype=...,
             quantize=..., engine=..., device=...) -> Estimate
    estimate(model, task="finetune", method=..., optimizer=..., ...) -> Estimate   (estimate/finetune.py)

inference.py has the formulas, breakdown.py the Estimate, cli.py `memwise estimate`.
"""
from __future__ import annotations

from typing import Any

from memwise.errors import UnsupportedError, shown
from memwise.estimate.breakdown import Estimate
from memwise.estimate.inference import EstimateError, estimate_inference

TASKS = ("inference", "finetune")
FINETUNE_MISSING = "fine-tuning estimates are not available in this build"


def estimate(model: Any, task: str = "inference", **settings: Any) -> Estimate:
    """The predicted peak memory of `task` on `model` (a source as memwise.load takes it), with its
    breakdown; settings are estimate_inference's or estimate_finetune's keywords."""
    if task == "inference":
        return estimate_inference(model, **settings)
    if task == "finetune":
        try:
            from memwise.estimate.finetune import estimate_finetune
        except ModuleNotFoundError as e:
            if e.name != "memwise.estimate.finetune":
                raise
            raise UnsupportedError(FINETUNE_MISSING) from None
        from memwise.source import resolve_model

        spec = model.spec if hasattr(model, "spec") else resolve_model(model).spec
        return estimate_finetune(spec, **settings)
    raise EstimateError(f"unknown task {shown(task)} (known: {', '.join(TASKS)})")


__all__ = ["Estimate", "EstimateError", "estimate", "estimate_inference"]
