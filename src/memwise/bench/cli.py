"""The `memwise bench` command: flags, the live progress display, and `memwise bench report DIR`.

memwise/cli.py calls add_parser(subparsers); `python -m memwise.bench` runs the same parser alone.
Flag mistakes print one line and exit 2; a bad model source exits 1 (MemwiseError, like the other
commands); a run in which some cell failed exits 1 after writing everything it measured.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from memwise.cli_support import EXIT_USAGE, one_line_errors, run_command
from memwise.dtypes import DTYPES


class UsageError(Exception):
    """A flag combination argparse cannot check by itself; reported like argparse's own errors."""


def _integer_at_least(low: int, wanted: str):
    """An argparse type: an integer >= low, with a message that says what was wanted."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value
    return parse


_positive = _integer_at_least(1, "a positive integer")
_non_negative = _integer_at_least(0, "an integer >= 0")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value:g}")
    return value


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `bench` (and `bench report DIR`) to a parent CLI's subparsers; sets args.func."""
    parser = subparsers.add_parser(
        "bench", help="measure speed and peak memory, one fresh process per cell",
        description="Measure speed and peak memory of models x engines x dtypes x batch sizes x prompt lengths "
                    "x new tokens, each cell in a fresh process. With no flags: the 370M class (mmfree-370m, "
                    "gpt2-medium, opt-350m) on memwise and transformers, batch 1, 128 prompt + 128 new tokens.")
    add_arguments(parser)
    parser.set_defaults(func=measure_command)
    nested = parser.add_subparsers(dest="bench_command", title="subcommands", metavar="{report DIR, serve MODEL}")
    report = nested.add_parser("report", help="re-render table, results.csv/.md and plots from DIR/results.json",
                               description="Re-render the table, results.csv, results.md and the plots of a "
                                           "bench output directory from its results.json.")
    report.add_argument("directory", metavar="DIR", type=Path)
    report.set_defaults(func=report_command)
    from memwise.bench.serve_bench import add_serve_parser

    serve = add_serve_parser(nested, _positive)
    one_line_errors(parser)
    one_line_errors(report)
    one_line_errors(serve)
    return parser


# GGUF types a llama.cpp cell's --dtype may name besides the torch dtypes (memwise.bench.gguf_format)
GGUF_DTYPES = ("q8_0", "q4_0", "tq2_0", "tq1_0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from memwise.bench.engines import ENGINES

    what = parser.add_argument_group("what to measure (repeat a flag for several values)")
    what.add_argument("--model", action="append", metavar="SOURCE",
                      help="model directory, hub id, preset:NAME, or a preset name such as gpt2-medium "
                           "(real weights if cached, else synthetic)")
    what.add_argument("--engine", action="append", choices=sorted(ENGINES))
    what.add_argument("--dtype", action="append", choices=tuple(DTYPES) + GGUF_DTYPES,
                      help="float32, float16, bfloat16; llama.cpp cells also take a GGUF type: q8_0, q4_0, "
                           "tq2_0, tq1_0 (float32 / float16 are F32 / F16 there)")
    what.add_argument("--quantize", choices=("int8", "int4", "nf4"), metavar="SCHEME",
                      help="memwise engine: store the decoder layers' weights in SCHEME (int8, int4, nf4); "
                           "other engines as given")
    what.add_argument("--kv-cache", choices=("int8", "int4"), metavar="SCHEME",
                      help="memwise engine: store the KV cache in SCHEME (int8, int4); other engines as given")
    what.add_argument("--max-memory", metavar="BYTES", help="memwise engine: offload the weights that do not fit "
                      "BYTES to --offload-dir and stream them in layer by layer (docs/offload.md)")
    what.add_argument("--offload-dir", metavar="DIR", help="where --max-memory keeps the offloaded weights")
    what.add_argument("--batch-size", action="append", type=_positive, metavar="N")
    what.add_argument("--prompt-tokens", action="append", type=_positive, metavar="N")
    what.add_argument("--new-tokens", action="append", type=_positive, metavar="N")
    what.add_argument("--suite", choices=("default", "seed", "ternary", "peers", "lite"), default="default",
                      help="seed: the public comparison's three size classes, prompts and settings; "
                           "ternary: MatMul-free models on the packed kernels vs transformers on opt-2.7b "
                           "and gpt2-medium (batch 1 and 16); peers: memwise vs llama.cpp (MatMul-free "
                           "models vs their TQ2_0 shape twins, gpt2-medium at F32 and Q8_0); lite: the "
                           "peers cells of mmfree-370m, with memwise-lite (no torch)")
    what.add_argument("--sweep", choices=("context", "batch"),
                      help="speed and memory over prompt length (KV cache) or batch size")
    what.add_argument("--kernels", action="store_true", help="run the ternary kernel micro-benchmark instead")
    how = parser.add_argument_group("how")
    how.add_argument("--runs", type=_positive, help="timed runs per cell (default 3; seed suite: one per prompt)")
    how.add_argument("--warmup", type=_non_negative, help="untimed runs before them (default 1)")
    how.add_argument("--threads", type=_positive, help="CPU threads per cell (default: torch's choice)")
    how.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    how.add_argument("--busy-cores", type=_non_negative, default=0, metavar="N",
                     help="also time every run beside N busy-loop processes (unpinned), back to back with "
                          "the usual run; the report adds their speeds and the ratio busy/idle")
    how.add_argument("--force", action="store_true",
                     help="run cells predicted to exceed the memory available (without it the run is refused)")
    how.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="give up on a cell after this long")
    how.add_argument("--out", type=Path, metavar="DIR",
                     help="write results.json, results.csv, results.md, plots and cell logs here")


def _command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "bench_argv", None)
    if argv is None:
        argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else sys.argv[1:]
    return shlex.join(["memwise", "bench", *argv])


def _check(args: argparse.Namespace) -> None:
    if args.sweep and args.suite != "default":
        raise UsageError(f"--sweep and --suite {args.suite} are separate runs; give one of them")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a file; give a directory (created if missing)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: torch sees no CUDA device on this machine")


def measure_command(args: argparse.Namespace) -> int:
    try:
        _check(args)
    except UsageError as e:
        print(f"memwise bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.kernels:
        return kernels_command(args)
    from memwise.bench.machine import machine_metadata, read_bandwidth
    from memwise.bench.report import print_table, write_outputs
    from memwise.bench.runner import RunOptions, add_decode_ceilings
    from memwise.bench.suites import PUBLISHED, PUBLISHED_LABEL, build_matrix

    matrix = build_matrix(args.suite, args.sweep, models=args.model, engines=args.engine, dtypes=args.dtype,
                          batch_sizes=args.batch_size, prompt_tokens=args.prompt_tokens,
                          new_tokens=args.new_tokens, runs=args.runs, warmup=args.warmup)
    from rich.console import Console

    console = Console(stderr=True)
    metadata = machine_metadata(_command_line(args))
    metadata.update(suite=matrix.suite, sweep=matrix.sweep, threads=args.threads, device=args.device,
                    runs=matrix.runs, warmup=matrix.warmup, busy_cores=args.busy_cores)
    if matrix.suite == "seed":
        metadata["published"] = {"label": PUBLISHED_LABEL, "numbers": PUBLISHED}
        metadata["seed_settings"] = {"prompts": matrix.prompts, "max_length": matrix.max_length,
                                     "repetition_penalty": matrix.repetition_penalty,
                                     "no_repeat_ngram_size": matrix.no_repeat_ngram_size, "eos": "ignored"}
    if (args.max_memory is None) != (args.offload_dir is None):
        from memwise.errors import MemwiseError
        raise MemwiseError("--max-memory and --offload-dir go together: offloading needs both")
    options = RunOptions(threads=args.threads, device=args.device, quantize=args.quantize, kv_cache=args.kv_cache,
                         timeout_s=args.timeout, max_memory=args.max_memory, offload_dir=args.offload_dir,
                         over_memory="force" if args.force else "refuse",
                         log_dir=args.out / "logs" if args.out is not None else None, busy_cores=args.busy_cores)
    # Bandwidth is measured before and after the cells, never during one; other load on the machine
    # can only lower a reading, so the larger one is the better estimate of what the memory can do.
    with console.status("measuring memory bandwidth"):
        before, method = read_bandwidth(args.device)
    records = _run_with_progress(matrix, options, console)
    with console.status("measuring memory bandwidth"):
        after, _ = read_bandwidth(args.device)
    metadata.update(memory_bandwidth_bytes_per_s=max(before, after), memory_bandwidth_method=method,
                    memory_bandwidth_samples_bytes_per_s=[before, after])
    add_decode_ceilings(records, metadata["memory_bandwidth_bytes_per_s"])
    print_table(records, metadata)
    if args.out is not None:
        written = write_outputs(args.out, metadata, records)
        console.print(f"wrote {', '.join(p.name for p in written)} to {args.out}")
    return 1 if any(r.get("status") == "error" for r in records) else 0


def _run_with_progress(matrix: Any, options: Any, console: Any) -> list[dict[str, Any]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from memwise.bench.runner import run_matrix

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True, refresh_per_second=2) as progress:
        task = progress.add_task("resolving models", total=None)

        def on_start(i: int, n: int, spec: Any) -> None:
            progress.update(task, total=n, description=f"{spec.model} · {spec.engine} · {_weights_label(vars(spec))} · "
                                                       f"batch {spec.batch_size} · {spec.prompt_tokens}+{spec.new_tokens} tokens")

        def on_done(i: int, n: int, record: dict[str, Any]) -> None:
            progress.advance(task)
            progress.console.print(_summary(record), markup=False, highlight=False, soft_wrap=True)

        return run_matrix(matrix, options, on_start, on_done)


def _weights_label(cell: dict[str, Any]) -> str:
    """dtype, and the weight and KV-cache schemes of a quantized memwise cell ("float32 int8 kv:int4")."""
    extra = [cell.get("quantize") or "", f"kv:{cell['kv_cache']}" if cell.get("kv_cache") else ""]
    return " ".join([cell["dtype"], *filter(None, extra)])


def _summary(record: dict[str, Any]) -> str:
    head = f"{record['model']} · {record['engine']} · {_weights_label(record)} · b{record['batch_size']} " \
           f"p{record['prompt_tokens']} n{record['new_tokens']}"
    if record.get("status") != "ok":
        return f"{head}: {record.get('status')}: {record.get('reason')}"
    from memwise.bench.cell import peak_bytes

    decode = record.get("decode_tok_s")
    decode_text = f"{decode:.1f} tok/s" if decode is not None else "n/a"
    busy = ""
    if record.get("busy_cores"):
        busy = (f", beside {record['busy_cores']} busy: decode x{_ratio(record.get('busy_decode_ratio'))}, "
                f"prefill x{_ratio(record.get('busy_prefill_ratio'))}")
    return (f"{head}: load {record['load_s']:.1f} s, TTFT {record['ttft_s']:.3f} s, decode {decode_text}, "
            f"peak {(peak_bytes(record) or 0) / 2**20:,.0f} MiB{busy}")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def report_command(args: argparse.Namespace) -> int:
    from memwise.bench.report import load_results, print_table, write_outputs

    metadata, records = load_results(args.directory)
    print_table(records, metadata)
    written = write_outputs(args.directory, metadata, records, write_json=False)
    print(f"wrote {', '.join(p.name for p in written)} to {args.directory}", file=sys.stderr)
    return 0


def kernels_command(args: argparse.Namespace) -> int:
    try:
        from memwise.bench.kernels import format_kernel_bench, run_kernel_bench
    except ImportError as e:
        print(f"memwise bench: kernel micro-benchmark unavailable, skipped ({e})", file=sys.stderr)
        return 0
    records = run_kernel_bench()
    text = format_kernel_bench(records)
    print(text)
    if args.out is not None:
        from memwise.bench.report import write_atomic

        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / "kernels.txt", text + "\n")
        try:
            write_atomic(args.out / "kernels.json", json.dumps(records, indent=2, default=str) + "\n")
        except (TypeError, ValueError):
            pass  # records that are not JSON data: the text table is still there
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m memwise.bench`: the bench command on its own, same flags, messages and exit codes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="memwise")
    add_parser(parser.add_subparsers())
    one_line_errors(parser)
    args = parser.parse_args(["bench", *argv])
    args.bench_argv = argv
    return run_command(args)
