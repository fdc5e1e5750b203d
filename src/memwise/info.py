"""`memwise info`: what a model is and what its weights take, from its config alone."""
from __future__ import annotations

from rich.table import Table

from memwise.hub import resolve_source
from memwise.models import family_for
from memwise.presets import is_preset, preset_config, preset_name
from memwise.spec import ModelSpec, read_config


def spec_for(source: str, revision: str | None = None) -> tuple[ModelSpec, object]:
    """The spec and family module of a source, reading only its config."""
    if is_preset(source):
        config, where = preset_config(source), f"preset:{preset_name(source)}"
    else:
        directory = resolve_source(source, revision)
        config, where = read_config(directory), str(directory / "config.json")
    family = family_for(config.get("model_type"), where)
    spec = family.spec_from_config(config, where)
    spec.source, spec.synthetic = source, is_preset(source)
    return spec, family


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def describe(source: str, revision: str | None = None) -> Table:
    spec, family = spec_for(source, revision)
    sizes = family.weight_sizes(spec)
    table = Table(title=source, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("weights", "synthetic (preset: random values)" if spec.synthetic else "real (checkpoint)")
    table.add_row("parameters", f"{sizes['bfloat16'] // 2:,}")
    for kind, nbytes in sizes.items():
        table.add_row(f"weights, {kind}", human_bytes(nbytes))
    skip = {"source", "synthetic"}
    for name, value in spec.to_dict().items():
        if name not in skip:
            table.add_row(name, str(value))
    return table
