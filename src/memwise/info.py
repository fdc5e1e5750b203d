"""`memwise info`: what a model is and what its weights take, from its config alone."""
from __future__ import annotations

from rich.table import Table

from memwise.quantization import BYTES_PER_PARAMETER, SCHEMES
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
        per = f" ({BYTES_PER_PARAMETER[kind]:g} B/param)" if kind in BYTES_PER_PARAMETER else ""
        if "packed" in kind:
            per = f" ({BYTES_PER_PARAMETER['ternary (packed 2-bit)']:g} B/weight in ternary matrices)"
        table.add_row(f"weights, {kind}{per}", human_bytes(nbytes))
    for name, text in scheme_sizes(family, spec).items():
        table.add_row(f"weights, quantize={name}", text)
    if spec.model_type != "hgrn_bit":
        for name, text in kv_cache_sizes(spec).items():
            table.add_row(f"KV cache per token, {name}", text)
    skip = {"source", "synthetic"}
    for name, value in spec.to_dict().items():
        if name not in skip:
            table.add_row(name, str(value))
    return table


def kv_cache_sizes(spec) -> dict[str, str]:
    """Bytes one token adds to the KV cache (all layers, keys and values) at float32 and each KV scheme."""
    from memwise.kernels import kv_quant

    vectors = 2 * spec.num_layers * spec.num_kv_heads
    rows = {"float32": f"{human_bytes(vectors * spec.head_dim * 4)} (4 B/number)"}
    for scheme in kv_quant.KV_SCHEMES:
        if scheme == "int4" and spec.head_dim % 2:
            continue
        per_vector = kv_quant.bytes_per_vector(scheme, spec.head_dim)
        rows[f"kv_cache={scheme}"] = f"{human_bytes(vectors * per_vector)} ({per_vector / spec.head_dim:.4g} B/number)"
    return rows


def scheme_sizes(family, spec) -> dict[str, str]:
    """What each quantization scheme would hold: its bytes per weight and the model's size, or why not."""
    import torch

    rows = {}
    for scheme in SCHEMES.values():
        per = f"{scheme.bytes_per_weight:g} B/weight"
        if not scheme.implemented:
            rows[scheme.name] = f"{per}: not yet implemented"
        elif not hasattr(family, "quantized_weights_bytes"):
            rows[scheme.name] = f"{per}: n/a (already ternary)"
        else:
            nbytes = family.quantized_weights_bytes(spec, scheme.name, torch.float32)
            rows[scheme.name] = (f"{human_bytes(nbytes)} ({per} in the layers' linears; token embedding and "
                                 "lm_head int8, one table when tied, + 8 B per output row; position table "
                                 "and norms float32)")
    return rows
