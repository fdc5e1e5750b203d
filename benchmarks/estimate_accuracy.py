"""Prediction error of `memwise estimate` over `memwise bench` runs: every ok cell's
predicted_peak_bytes against its peak (max of load and generation peak, as bench/cell.py defines
it), then the median and the largest |error|. Prints a markdown table.

    PYTHONPATH=src python benchmarks/estimate_accuracy.py RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

MiB = 2**20


def today(record: dict) -> int:
    """The record's cell predicted by today's estimator (the bench stored the estimator of its day)."""
    from memwise.estimate import estimate_inference

    return estimate_inference(f"preset:{record['model']}", batch_size=record["batch_size"],
                              prompt_tokens=record["prompt_tokens"], new_tokens=record["new_tokens"],
                              dtype=record["dtype"], quantize=record.get("quantize"),
                              engine=record["engine"]).predicted_peak_bytes


def rows(run_dir: Path, repredict: bool = False) -> list[dict]:
    out = []
    for record in json.loads((run_dir / "results.json").read_text())["results"]:
        if record.get("status") != "ok" or not record.get("peak_rss_bytes") or not record.get("predicted_peak_bytes"):
            continue
        measured = max(record["peak_rss_bytes"], record.get("load_peak_rss_bytes") or 0)
        predicted = today(record) if repredict else record["predicted_peak_bytes"]
        out.append({"run": run_dir.name, "model": record["model"], "engine": record["engine"],
                    "weights": record.get("quantize") or record["dtype"], "batch": record["batch_size"],
                    "tokens": f"{record['prompt_tokens']}+{record['new_tokens']}",
                    "after_load": record.get("rss_after_load_bytes"), "load_peak": record.get("load_peak_rss_bytes"),
                    "measured": measured, "predicted": predicted,
                    "error_pct": round(100.0 * (predicted - measured) / measured, 2)})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| run | model | engine | weights | batch | tokens | after load MiB | load peak MiB | peak MiB | "
             "predicted MiB | error |", "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['run']} | {r['model']} | {r['engine']} | {r['weights']} | {r['batch']} | {r['tokens']} | "
                     f"{(r['after_load'] or 0) / MiB:,.0f} | {(r['load_peak'] or 0) / MiB:,.0f} | "
                     f"{r['measured'] / MiB:,.0f} | {r['predicted'] / MiB:,.0f} | {r['error_pct']:+.1f}% |")
    errors = [abs(r["error_pct"]) for r in table]
    if errors:
        lines.append(f"\n{len(errors)} cells: median |error| {statistics.median(errors):.2f}%, "
                     f"max |error| {max(errors):.2f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="directories written by memwise bench --out")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--repredict", action="store_true", help="today's estimator instead of the stored prediction")
    args = parser.parse_args()
    table = [row for run in args.runs for row in rows(run, args.repredict)]
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    print(markdown(table))


if __name__ == "__main__":
    main()
