"""`memwise plan MODEL --max-memory 2GiB`: the offload policy the planner chooses (memwise.offload.plan)
and its predicted throughput, as a table or JSON. memwise/cli.py calls add_parser(subparsers).

The cost figures are this machine's, measured on first use and cached (memwise.offload.costs);
--costs FILE plans with figures from a file instead (another machine's, or a test's).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from memwise.cli_support import one_line_errors, positive_int
from memwise.offload.costs import Costs, cache_path, load_costs
from memwise.offload.probes import machine_costs
from memwise.offload.plan import Plan, PlanError, plan
from memwise import sizes

DEFAULT_BATCHES = (1, 8, 32, 64)


def parse_size(text: str, flag: str = "--max-memory") -> int:
    return sizes.parse_size(text, flag, PlanError)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="choose which layers stream from disk, where the KV cache lives and the batch (docs/offload-plan.md)",
        description="Plan an offloaded run of MODEL (a model directory, a hub id or preset:NAME) within a memory "
                    "budget: a linear program over this machine's measured disk, memory and kernel figures.")
    parser.add_argument("source", metavar="MODEL")
    parser.add_argument("--max-memory", required=True, metavar="BYTES",
                        help="memory budget beyond the runtime's own base, e.g. 2GiB")
    parser.add_argument("--quantize", metavar="SCHEME", help="weights in SCHEME (int8, int4, nf4); float32 without")
    parser.add_argument("--batch", type=positive_int, nargs="+", metavar="N",
                        help=f"candidate batch sizes (default {' '.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--prompt-tokens", type=positive_int, default=128, metavar="P")
    parser.add_argument("--new-tokens", type=positive_int, default=32, metavar="N")
    parser.add_argument("--offload-dir", metavar="DIR", help="where the disk read figure is measured (default: the cache directory)")
    parser.add_argument("--remeasure", action="store_true", help="measure this machine's figures again")
    parser.add_argument("--costs", metavar="FILE", help="plan with the figures of a cost file instead of this machine's")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=plan_command)
    one_line_errors(parser)
    return parser


def plan_command(args: argparse.Namespace) -> int:
    budget = parse_size(args.max_memory)
    batches = tuple(args.batch or DEFAULT_BATCHES)
    if args.costs:
        costs, costs_file = load_costs(Path(args.costs)), Path(args.costs)
    else:
        def log(line: str) -> None:
            print(f"memwise plan: {line}", file=sys.stderr)
        costs = machine_costs(Path(args.offload_dir) if args.offload_dir else None, remeasure=args.remeasure, log=log)
        costs_file = cache_path()
    result = plan(args.source, budget, costs, scheme=args.quantize, batch_sizes=batches,
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    if args.json:
        print(json.dumps({**result.to_json(), "costs": costs.to_json(), "costs_file": str(costs_file)}))
    else:
        _print_plan(result, costs, costs_file)
    return 0


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _print_plan(result: Plan, costs: Costs, costs_file: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    p = result.policy
    table = Table(title=f"{p.model} ({p.scheme}) in {_size(p.budget_bytes)}",
                  caption=f"{p.prompt_tokens} prompt + {p.new_tokens} new tokens per sequence; figures of "
                          f"{costs.machine}: disk {costs.disk_read_bytes_per_s / 1e9:.2f} GB/s"
                          f"{'' if costs.disk_direct else ' (no O_DIRECT)'} ({costs.overlapped_disk_bytes_per_s / 1e9:.2f}"
                          f" beside the products, which run at {costs.products_beside_reads:.0%} beside reads), memory "
                          f"{costs.memory_read_bytes_per_s / 1e9:.1f} GB/s ({costs_file})")
    table.add_column("policy")
    table.add_column("value", justify="right")
    rows = [("weights: resident layers", f"{p.resident_layers} of {p.layers}"),
            ("weights: streamed from disk", f"{p.streamed_layers} layers"),
            ("KV cache", p.kv_placement + (f" ({p.kv_disk_layers} layers on disk)" if p.kv_placement == "split" else "")),
            ("batch size", str(p.batch_size)),
            ("micro-batches", f"{p.micro_batches} x {p.batch_size // p.micro_batches} sequences"),
            ("predicted throughput", f"{p.predicted_tokens_per_s:.2f} tokens/s (prefill + decode)"),
            ("predicted decode", f"{p.predicted_decode_tokens_per_s:.2f} tokens/s, bound by {p.decode_bound}"),
            ("predicted prefill", f"{p.predicted_prefill_s:.2f} s"),
            ("disk read per token", _size(p.disk_bytes_per_token)),
            ("predicted peak", f"{_size(p.predicted_peak_bytes)} (runtime base {_size(p.runtime_base_bytes)} "
                               f"+ {_size(p.budgeted_bytes)} budgeted)")]
    for name, value in rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    parts = ", ".join(f"{name} {_size(size)}" for name, size in p.memory.items() if size)
    console.print(f"budgeted memory: {parts}", markup=False, highlight=False)
    for note in costs.notes:
        console.print(f"note on the figures ({costs.measured_at}): {note}", markup=False, highlight=False)
