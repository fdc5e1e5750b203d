"""Rendering results: the terminal table, results.json / .csv / .md, and PNG plots.

Everything here works from the records and metadata alone, so `memwise bench report DIR` re-renders a
run from its results.json exactly as the run itself rendered it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from memwise.bench import targets
from memwise.bench.cell import RECORD_FIELDS, peak_bytes
from memwise.errors import MemwiseError
from memwise.json_file import read_json

SYNTHETIC_NOTE = ("synthetic: random weights of the identical architecture (no real checkpoint in the local "
                  "cache); speed and memory are those of the architecture, the generated text is meaningless")

# (header, record key) of the table, in order; "peak" is peak_bytes(record). None prints as "-".
COLUMNS: list[tuple[str, str]] = [
    ("Model", "model"), ("Engine", "engine"), ("Weights", "weights"), ("dtype", "dtype"), ("Quantize", "quantize"), ("KV cache", "kv_cache"),
    ("Device", "device"),
    ("Batch", "batch_size"), ("Prompt", "prompt_tokens"), ("New", "new_tokens"), ("Load s", "load_s"),
    ("TTFT s", "ttft_s"), ("Prefill tok/s", "prefill_tok_s"), ("TPOT ms", "tpot_s"),
    ("Decode tok/s", "decode_tok_s"), ("Ceiling tok/s", "decode_ceiling_tok_s"), ("E2E s", "e2e_s"),
    ("Peak MiB", "peak"), ("Predicted MiB", "predicted_peak_bytes"), ("Predicted error", "prediction_error"),
    ("Load peak MiB", "load_peak_rss_bytes"), ("Weights MiB", "weights_bytes"),
    ("Status", "status"),
]
# With --busy-cores: speeds beside busy processes and their ratio to the usual run's (cell.py).
BUSY_COLUMNS: list[tuple[str, str]] = [
    ("Busy cores", "busy_cores"), ("Busy prefill tok/s", "busy_prefill_tok_s"),
    ("Busy decode tok/s", "busy_decode_tok_s"), ("Prefill busy/idle", "busy_prefill_ratio"),
    ("Decode busy/idle", "busy_decode_ratio"),
]
TEXT_COLUMNS = {"Model", "Engine", "Weights", "dtype", "Quantize", "KV cache", "Device", "Status"}
# Shown in the caption instead of a column when every row has the same value.
FOLDABLE = {"dtype", "quantize", "kv_cache", "device", "batch_size", "prompt_tokens", "new_tokens"}


def _cell_text(record: dict[str, Any], key: str) -> str:
    if key == "peak":
        value: Any = peak_bytes(record)
    elif key == "dtype":
        value = record.get("weights_format") or record.get("dtype")     # a GGUF type says more than float32
    elif key == "prediction_error":
        return prediction_error_text(record)
    else:
        value = record.get(key)
    if value is None:
        return "-"
    if key == "weights":
        return "synthetic*" if value == "synthetic" else str(value)
    if key == "status":
        return "ok" if value == "ok" else f"{value} [{record.get('_note', '')}]"
    if key in ("peak", "predicted_peak_bytes", "load_peak_rss_bytes", "weights_bytes", "cuda_max_allocated_bytes"):
        return f"{value / 2**20:,.0f}"
    if key.endswith("_ratio"):
        return f"{value:.2f}"
    if key == "tpot_s":
        return f"{value * 1000:.1f}"
    if key.endswith("tok_s"):
        return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"
    if key.endswith("_s"):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def prediction_error(record: dict[str, Any]) -> float | None:
    """predicted / measured peak - 1 (memwise.estimate against the cell), or None without both."""
    measured, predicted = peak_bytes(record), record.get("predicted_peak_bytes")
    if not measured or predicted is None or record.get("status") != "ok":
        return None
    return predicted / measured - 1


def prediction_error_text(record: dict[str, Any]) -> str:
    error = prediction_error(record)
    return "-" if error is None else f"{error * 100:+.1f}%"


def _annotate(records: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Number the reasons of skipped and failed cells so the table can point at them below it; cells
    skipped for the same reason share one number."""
    notes: list[tuple[int, dict[str, Any]]] = []
    numbers: dict[tuple, int] = {}
    for record in records:
        if record.get("status") != "ok":
            key = (record.get("model"), record.get("engine"), record.get("status"), record.get("reason"))
            if key not in numbers:
                numbers[key] = len(numbers) + 1
                notes.append((numbers[key], record))
            record["_note"] = numbers[key]
    return notes


def _columns(records: list[dict[str, Any]], published: dict[str, Any] | None) -> tuple[list[tuple[str, str]], str]:
    columns, fixed = [], []
    for header, key in COLUMNS:
        values = {json.dumps(r.get(key)) for r in records}
        if key in ("quantize", "kv_cache") and values <= {"null"}:
            continue    # no cell quantized: nothing to say
        if key in ("predicted_peak_bytes", "prediction_error") and \
                all(r.get("predicted_peak_bytes") is None for r in records):
            continue    # results written before predictions, or models without formulas
        if key in FOLDABLE and len(values) == 1 and records:
            fixed.append(f"{header.lower()} {records[0].get(key)}")
            continue
        columns.append((header, key))
    if any(r.get("cuda_max_allocated_bytes") is not None for r in records):
        columns.insert(-1, ("CUDA max MiB", "cuda_max_allocated_bytes"))
    if any(r.get("busy_cores") for r in records):
        at = next(i for i, (_, key) in enumerate(columns) if key == "decode_tok_s") + 1
        columns[at:at] = BUSY_COLUMNS
    if published:
        label = published.get("label", "published")
        columns.insert(-1, (f"s/answer ({label})", "_published_s"))
        columns.insert(-1, (f"peak MB ({label})", "_published_mb"))
    return columns, " · ".join(fixed)


def _with_published(records: list[dict[str, Any]], published: dict[str, Any] | None) -> None:
    numbers = (published or {}).get("numbers", {})
    for record in records:
        entry = numbers.get(record.get("model"), {})
        record["_published_s"] = entry.get("seconds_per_answer")
        record["_published_mb"] = entry.get("peak_mb")


def _text(record: dict[str, Any], key: str) -> str:
    if key == "_published_s":
        return "-" if record.get(key) is None else f"{record[key]:g}"
    if key == "_published_mb":
        return "-" if record.get(key) is None else f"{record[key]:,}"
    return _cell_text(record, key)


def table_rows(records: list[dict[str, Any]], metadata: dict[str, Any]) -> tuple[list[str], list[list[str]], str, list[str]]:
    """(headers, rows, caption, notes) shared by the terminal table and results.md."""
    records = [dict(r) for r in records]
    published = metadata.get("published")
    _with_published(records, published)
    notes = _annotate(records)
    columns, fixed = _columns(records, published)
    headers = [h for h, _ in columns]
    rows = [[_text(r, key) for _, key in columns] for r in records]
    lines = [f"[{n}] {r.get('model')} · {r.get('engine')}: {r.get('status')}: {r.get('reason')}" for n, r in notes]
    if any(r.get("weights") == "synthetic" for r in records):
        lines.append("* " + SYNTHETIC_NOTE)
    caption_parts = [fixed] if fixed else []
    if metadata.get("memory_bandwidth_bytes_per_s"):
        caption_parts.append(f"read bandwidth {metadata['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    caption_parts.append("medians of timed runs; peak = max(load, generation) resident set")
    if metadata.get("busy_cores"):
        caption_parts.append(f"busy: the same runs beside {metadata['busy_cores']} busy-loop processes, "
                             f"busy/idle the median ratio of back-to-back pairs")
    return headers, rows, " · ".join(caption_parts), lines


def print_table(records: list[dict[str, Any]], metadata: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped or redirected output would otherwise be folded to 80 columns; a file can be wide.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    headers, rows, caption, notes = table_rows(records, metadata)
    title = f"memwise bench · {metadata.get('cpu_model', '?')} · {metadata.get('date', '')}"
    table = Table(title=title, caption=caption, show_lines=False)
    for header in headers:
        table.add_column(header, justify="left" if header in TEXT_COLUMNS else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in notes:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if targets.applies(metadata):
        for line in targets.text_lines(targets.evaluate(records, targets.for_suite(metadata))):
            console.print(line, markup=False, highlight=False, soft_wrap=True)


def markdown(records: list[dict[str, Any]], metadata: dict[str, Any]) -> str:
    headers, rows, caption, notes = table_rows(records, metadata)
    versions = metadata.get("versions") or {}
    out = io.StringIO()
    out.write("# memwise bench\n\n")
    out.write(f"- Command: `{metadata.get('command', '')}`\n")
    out.write(f"- Date: {metadata.get('date', '')}\n")
    out.write(f"- Machine: {metadata.get('machine', '')}; CPU: {metadata.get('cpu_model', '')}"
              f"{' (' + metadata['cpu_identity'] + ')' if metadata.get('cpu_identity') else ''}, "
              f"{metadata.get('cores', '?')} cores; RAM: {(metadata.get('ram_bytes') or 0) / 2**30:.1f} GiB; "
              f"GPU: {metadata.get('gpu') or 'none'}"
              f"{'; kernels: ' + metadata['kernel_isa'] if metadata.get('kernel_isa') else ''}\n")
    if metadata.get("memory_bandwidth_bytes_per_s"):
        out.write(f"- Read bandwidth: {metadata['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
                  f"({metadata.get('memory_bandwidth_method', '')})\n")
    out.write("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + "\n\n")
    out.write("| " + " | ".join(headers) + " |\n")
    out.write("|" + "|".join("---" if h in TEXT_COLUMNS else "---:" for h in headers) + "|\n")
    for row in rows:
        out.write("| " + " | ".join(_md_escape(cell) for cell in row) + " |\n")
    out.write(f"\n{caption}\n\n")
    out.write("".join(f"- {_md_escape(line)}\n" for line in notes))
    if targets.applies(metadata):
        out.write("\n" + targets.markdown(targets.evaluate(records, targets.for_suite(metadata))))
    return out.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def csv_text(records: list[dict[str, Any]]) -> str:
    fields = list(RECORD_FIELDS) + sorted({k for r in records for k in r} - set(RECORD_FIELDS))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record.items()})
    return out.getvalue()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write through a temporary file and rename, so an interrupted run leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def _label(record: dict[str, Any]) -> str:
    return record["model"] + (" *" if record.get("weights") == "synthetic" else "")


def plots(records: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, bytes]:
    """PNG plots by file name: bars per model and engine, or lines over a sweep's variable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return {}
    metrics = [("decode_tok_s", "decode tokens/s", lambda r: r.get("decode_tok_s")),
               ("peak_memory", "peak resident set (MiB)", lambda r: (peak_bytes(r) or 0) / 2**20)]
    sweep = metadata.get("sweep")
    axis = {"context": ("prompt_tokens", "prompt tokens"), "batch": ("batch_size", "batch size")}.get(sweep or "")
    footer = "* synthetic weights" if any(r.get("weights") == "synthetic" for r in ok) else ""
    images = {}
    for name, ylabel, value in metrics:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        if axis:
            key, xlabel = axis
            for series in dict.fromkeys((_label(r), r["engine"]) for r in ok):
                points = sorted((r[key], value(r)) for r in ok if (_label(r), r["engine"]) == series
                                and value(r) is not None)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                            label=f"{series[0]} · {series[1]}")
            ax.set_xlabel(xlabel)
            ax.set_title(f"{ylabel} vs {xlabel}")
            filename = f"sweep_{sweep}_{name}.png"
        else:
            # Every cell gets its slot, so a skipped or failed one shows as such instead of vanishing.
            groups = list(dict.fromkeys(_bar_group(r, records) for r in records))
            engines = list(dict.fromkeys(r["engine"] for r in records))
            width = 0.8 / max(len(engines), 1)
            for j, engine in enumerate(engines):
                xs, ys = [], []
                for i, group in enumerate(groups):
                    x = i + (j - (len(engines) - 1) / 2) * width
                    for r in records:
                        if _bar_group(r, records) != group or r["engine"] != engine:
                            continue
                        if r.get("status") == "ok" and value(r) is not None:
                            xs.append(x)
                            ys.append(value(r))
                        else:
                            ax.text(x, 0, f" {engine}: {r.get('status')}", rotation=90, ha="center", va="bottom",
                                    fontsize=8, color="gray")
                        break
                bars = ax.bar(xs, ys, width=width, label=engine)
                ax.bar_label(bars, fmt="%.0f" if name == "peak_memory" else "%.1f", fontsize=8)
            ax.set_xticks(range(len(groups)), groups, rotation=15 if len(groups) > 4 else 0)
            ax.set_title(f"{ylabel} per model and engine")
            filename = f"{name}.png"
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        if footer:
            fig.text(0.01, 0.01, footer, fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        images[filename] = buffer.getvalue()
    return images


def _bar_group(record: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """A bar's x label: the model, plus whatever shape varies across the run (dtype, batch, lengths)."""
    label = _label(record)
    for key, short in (("dtype", ""), ("batch_size", "b"), ("prompt_tokens", "p"), ("new_tokens", "n")):
        if len({r.get(key) for r in records}) > 1:
            label += f" {short}{record.get(key)}"
    return label


def write_outputs(directory: Path, metadata: dict[str, Any], records: list[dict[str, Any]],
                  write_json: bool = True) -> list[Path]:
    """results.json (unless re-rendering from it), results.csv, results.md and the plots, in directory."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    files: dict[str, str | bytes] = {}
    if write_json:
        files["results.json"] = json.dumps({"metadata": metadata, "results": records}, indent=2) + "\n"
    files["results.csv"] = csv_text(records)
    files["results.md"] = markdown(records, metadata)
    files.update(plots(records, metadata))
    for name, data in files.items():
        write_atomic(directory / name, data)
        written.append(directory / name)
    return written


def load_results(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = directory / "results.json"
    if not directory.is_dir():
        raise MemwiseError(f"{directory}: not a directory (expected a bench output directory with results.json)")
    if not path.is_file():
        raise MemwiseError(f"{path}: not found (run `memwise bench --out {directory}` first)")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise MemwiseError(f"{path}: expected an object with a 'results' list")
    return data.get("metadata") or {}, data["results"]
