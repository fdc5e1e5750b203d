"""`memwise estimate MODEL`: the predicted peak memory of a run and its breakdown, as a table or JSON,
and with --budget the inference configurations that fit in a given amount of memory.

memwise/cli.py calls add_parser(subparsers). No weights are loaded: MODEL is resolved to its config.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from memwise.cli_support import one_line_errors, positive_int
from memwise.errors import SourceError, UnsupportedError
from memwise.estimate import FINETUNE_MISSING, Estimate, EstimateError, estimate_inference
from memwise import sizes
from memwise.source import ModelSource

BUDGET_BATCHES = (1, 2, 4, 8, 16, 32)
FINETUNE_FLAGS = ("method", "optimizer", "batch_size", "seq_len", "lora_rank", "gradient_checkpointing",
                  "devices", "strategy")


def parse_bytes(text: str) -> int:
    return sizes.parse_size(text, "--budget", EstimateError)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "estimate", help="predict a run's peak memory and its breakdown (no weights are loaded)",
        description="Predict the peak memory of inference or fine-tuning on MODEL (a model directory, a hub id "
                    "or preset:NAME) by component. --budget lists the inference configurations that fit.")
    parser.add_argument("source", metavar="MODEL")
    parser.add_argument("--task", choices=("inference", "finetune"), default="inference")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="B")
    parser.add_argument("--prompt-tokens", type=positive_int, default=128, metavar="P")
    parser.add_argument("--new-tokens", type=positive_int, default=128, metavar="N")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--quantize", metavar="SCHEME", help="memwise engine: weights in SCHEME (int8, int4, nf4)")
    parser.add_argument("--kv-cache", metavar="SCHEME", help="memwise engine: KV cache in SCHEME (int8, int4)")
    parser.add_argument("--engine", default="memwise",
                        help="memwise (default), transformers, or memwise-reference (hgrn_bit, plain PyTorch path)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (no interpreter baseline)")
    parser.add_argument("--max-memory", metavar="BYTES", help="an offloaded run under this budget (weights: "
                        "what the offload plan keeps resident plus its read-ahead buffers)")
    parser.add_argument("--budget", metavar="BYTES", help="list the inference configurations that fit, fastest first")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    tune = parser.add_argument_group("fine-tuning (--task finetune)")
    tune.add_argument("--method", choices=("full", "lora", "qlora"), default="full")
    tune.add_argument("--optimizer", choices=("adamw", "sgd", "adamw8bit"), default="adamw")
    tune.add_argument("--seq-len", type=positive_int, default=512, metavar="S")
    tune.add_argument("--lora-rank", type=positive_int, default=8, metavar="R")
    tune.add_argument("--gradient-checkpointing", action="store_true")
    tune.add_argument("--devices", type=positive_int, metavar="N", help="devices (default 1)")
    # free text, checked by estimate_finetune: tp x dp combinations (tp2xdp4) are not a fixed list
    tune.add_argument("--strategy", metavar="S", help="dp (default), zero1, zero2, zero3, tp, pp, or tpAxdpB "
                      "(e.g. tp2xdp4)")
    parser.set_defaults(func=estimate_command)
    one_line_errors(parser)
    return parser


def estimate_command(args: argparse.Namespace) -> int:
    if args.budget is not None:
        if args.task != "inference":
            raise EstimateError("--budget lists inference configurations; it does not combine with --task finetune")
        budget = parse_bytes(args.budget)
        rows = fitting_configurations(_resolve(args.source), budget, args)
        _print_budget(rows, budget, args)
        return 0
    if args.task == "finetune":
        result = _finetune(args)
    elif args.devices is not None or args.strategy is not None:
        raise EstimateError("--devices and --strategy split fine-tuning (--task finetune); an inference "
                            "estimate is for one device")
    else:
        result = estimate_inference(_resolve(args.source), batch_size=args.batch_size,
                                    prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                    dtype=args.dtype, quantize=args.quantize, engine=args.engine,
                                    device=args.device, max_memory=_max_memory(args.max_memory),
                                    kv_cache=args.kv_cache)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _print_estimate(result, args.source)
    return 0


def _max_memory(text: str | None) -> int | None:
    if text is None:
        return None
    from memwise.offload.budget import parse_size
    return parse_size(text, "--max-memory")


def _finetune(args: argparse.Namespace) -> Estimate:
    try:
        from memwise.estimate.finetune import estimate_finetune
    except ModuleNotFoundError as e:   # only the module itself missing; its own import errors show
        if e.name != "memwise.estimate.finetune":
            raise
        raise UnsupportedError(FINETUNE_MISSING) from None
    spec = _resolve(args.source).spec
    options = {name: getattr(args, name) for name in FINETUNE_FLAGS}
    options["devices"] = options["devices"] or 1
    options["strategy"] = options["strategy"] or "dp"
    return estimate_finetune(spec, **options)


def _resolve(source: str) -> ModelSource:
    """The source's config. A preset name (or its hub id) whose checkpoint is not cached falls back
    to the preset's config, as `memwise bench` does: an estimate needs the shapes, not the weights."""
    from memwise.presets import HUB_IDS, PRESET_PREFIX
    from memwise.source import resolve_model

    try:
        return resolve_model(source)
    except SourceError:
        wanted = source.strip().lower()
        names = [name for name, hub_id in HUB_IDS.items() if wanted in (name.lower(), hub_id.lower())]
        if not names:
            raise
        print(f"{source}: no cached checkpoint; estimating from the preset's config (preset:{names[0]})",
              file=sys.stderr)
        return resolve_model(PRESET_PREFIX + names[0])


def _configurations(family_name: str, engine: str) -> list[tuple[str, str | None]]:
    """(dtype, scheme) pairs an engine can run a family in."""
    if engine == "transformers":
        return [("float32", None), ("bfloat16", None)]
    if family_name == "hgrn_bit":   # packed ternary weights, float32 activations
        return [("float32", None)]
    return [("float32", None), ("bfloat16", None), ("float32", "int8")]


def fitting_configurations(resolved: Any, budget: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (dtype or scheme) x batch whose predicted peak fits `budget`, fastest first: decoding is
    bound by the bytes each step reads (weights and the cache at full length), shared by the batch's
    tokens, so fewer bytes per generated token is faster; at equal bytes the larger batch first."""
    family_name = resolved.family.__name__.rsplit(".", 1)[-1]
    rows = []
    for dtype, scheme in _configurations(family_name, args.engine):
        for batch in BUDGET_BATCHES:
            result = estimate_inference(resolved, batch_size=batch, prompt_tokens=args.prompt_tokens,
                                        new_tokens=args.new_tokens, dtype=dtype, quantize=scheme,
                                        engine=args.engine, device=args.device)
            if result.predicted_peak_bytes > budget:
                continue
            read = sum(result.parts.get(k, 0) for k in ("weights", "kv_cache", "state"))
            rows.append({"dtype": dtype, "quantize": scheme, "batch_size": batch,
                         "predicted_peak_bytes": result.predicted_peak_bytes, "bytes_read_per_step": read})
    rows.sort(key=lambda r: (r["bytes_read_per_step"] / r["batch_size"], -r["batch_size"]))
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_estimate(result: Estimate, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    settings = ", ".join(f"{k} {v}" for k, v in result.settings.items() if v is not None and k != "model")
    table = Table(title=f"{source}: {result.task}", caption=settings)
    table.add_column("component")
    table.add_column("bytes", justify="right")
    table.add_column("MiB", justify="right")
    for name, size in result.parts.items():
        table.add_row(name, f"{size:,}", _mib(size))
    if result.per_device is not None:
        table.add_row("per device", f"{result.per_device:,}", _mib(result.per_device), style="bold")
    table.add_row("predicted peak", f"{result.predicted_peak_bytes:,}", _mib(result.predicted_peak_bytes),
                  style="bold")
    console = Console()
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)


def _print_budget(rows: list[dict[str, Any]], budget: int, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({"budget_bytes": budget, "engine": args.engine, "device": args.device,
                          "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "fits": rows}))
        return
    from rich.console import Console
    from rich.table import Table

    if not rows:
        print(f"no configuration of {args.source} fits in {_mib(budget)} "
              f"({args.prompt_tokens} prompt + {args.new_tokens} new tokens, engine {args.engine})")
        return
    table = Table(title=f"{args.source} in {_mib(budget)}: fastest first",
                  caption=f"engine {args.engine}, {args.prompt_tokens} prompt + {args.new_tokens} new tokens; "
                          "speed ranked by bytes read per generated token")
    for column in ("dtype", "quantize", "batch", "predicted peak", "read per step", "read per token"):
        table.add_column(column, justify="left" if column in ("dtype", "quantize") else "right")
    for row in rows:
        table.add_row(row["dtype"], row["quantize"] or "-", str(row["batch_size"]), _mib(row["predicted_peak_bytes"]),
                      _mib(row["bytes_read_per_step"]), _mib(row["bytes_read_per_step"] // row["batch_size"]))
    Console().print(table)


