"""`memwise info`: what a model is and what its weights take, from its config alone."""
from __future__ import annotations

from rich.table import Table

from memwise.source import resolve_model


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def describe(source: str, revision: str | None = None) -> Table:
    resolved = resolve_model(source, revision)
    spec, family = resolved.spec, resolved.family
    table = Table(title=source, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("weights", "synthetic (preset: random values)" if spec.synthetic else "real (checkpoint)")
    table.add_row("parameters", f"{family.parameter_count(spec):,}")
    for kind, nbytes in family.weight_sizes(spec).items():
        table.add_row(f"weights, {kind}", human_bytes(nbytes))
    skip = {"source", "synthetic"}
    for name, value in spec.to_dict().items():
        if name not in skip:
            table.add_row(name, str(value))
    return table
