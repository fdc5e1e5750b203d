"""Offloaded decoding under a memory budget: peak RSS against the budget plus the runtime's base,
and batch-1 decode speed against the disk-read bound.

    PYTHONPATH=src python benchmarks/offload_stream.py --model preset:opt-2.7b --quantize none \
        --quantize int8 --max-memory 2GiB --offload-dir /var/tmp/memwise-offload

For each scheme, fresh processes: one writes the offload file (once; its peak is reported too), one
loads it under the budget and generates (prompt of --prompt-tokens, --new-tokens greedy tokens), and
one before and one after that measure the O_DIRECT read bandwidth of the file (every layer region
once, one read per region, as the stream reads them; the larger reading is kept); where the file fits --resident-limit, a fourth decodes with
every layer resident (the compute bound) and checks its logits equal the streamed run's. The base is
the RSS after importing torch, memwise and the planner's solver (scipy.optimize: 38 MiB on the EPYC
VM, imported by every planned generation) and building the empty model (meta tensors, no weights). The disk-read bound is that bandwidth over the
bytes the stream read per decoded token. Other processes on the machine move these figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child_build(args: argparse.Namespace) -> dict:
    import memwise
    start = time.perf_counter()
    model = memwise.load(args.model, quantize=args.scheme, max_memory=args.max_memory, offload_dir=args.offload_dir)
    return {"build_s": time.perf_counter() - start, "build_peak_rss": vm("VmHWM"),
            "file_bytes": model.module.offload.path.stat().st_size}


def child_run(args: argparse.Namespace) -> dict:
    import torch
    import memwise
    from memwise.models.decoder.build import meta_model
    from memwise.source import resolve_model
    resolved = resolve_model(args.model)
    meta_model(resolved.spec, torch.float32, args.scheme)
    import scipy.optimize  # noqa: F401 (the planner's solver: part of the runtime's base)
    base = vm("VmRSS")
    start = time.perf_counter()
    model = memwise.load(args.model, quantize=args.scheme, max_memory=args.max_memory, offload_dir=args.offload_dir)
    load_s = time.perf_counter() - start
    prompt = torch.arange(10, 10 + args.prompt_tokens)[None]
    times, reads = [], []
    start = time.perf_counter()
    for _ in model.stream(prompt, args.new_tokens, ignore_eos=True):
        times.append(time.perf_counter() - start)
        # the generation's own stream: the runtime replaces the load's when its plan keeps another
        # number of layers resident
        reads.append(model.module.layer_stream.bytes_read)
    resident = model.module.offload_runtime.last.resident_layers
    logits = model.logits(prompt)
    torch.save(logits, Path(args.offload_dir) / f"logits-{args.scheme}.pt")
    decode_s = times[-1] - times[0]
    # reads run ahead by the buffers' depth; whole passes between first and last token even it out
    per_token = (reads[-1] - reads[0]) / (len(reads) - 1)
    plan = model.module.offload.plan
    return {"base_rss": base, "peak_rss": vm("VmHWM"), "load_s": load_s, "ttft_s": times[0],
            "decode_tok_s": (len(times) - 1) / decode_s, "bytes_read_per_token": per_token,
            "plan": f"{plan.describe()}; the generation's plan: {resident} resident",
            "resident_layers": resident, "streamed_layers": plan.num_layers - resident,
            "fallback_reason": model.module.offload.fallback_reason}


def child_resident(args: argparse.Namespace) -> dict:
    """Decode speed with every layer in memory (budget: the whole file plus 1 GiB): the compute bound."""
    import torch
    import memwise
    size = next(Path(args.offload_dir).glob(f"*-{args.scheme or 'none'}.mwoff")).stat().st_size
    model = memwise.load(args.model, quantize=args.scheme, max_memory=size + 2**30, offload_dir=args.offload_dir)
    prompt = torch.arange(10, 10 + args.prompt_tokens)[None]
    times, start = [], time.perf_counter()
    for _ in model.stream(prompt, args.new_tokens, ignore_eos=True):
        times.append(time.perf_counter() - start)
    same = torch.equal(model.logits(prompt), torch.load(Path(args.offload_dir) / f"logits-{args.scheme}.pt"))
    return {"resident_decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "logits_equal_all_resident": same}


def child_bandwidth(args: argparse.Namespace) -> dict:
    from memwise.offload.store import _PREAMBLE, StoreHeader
    from memwise.offload.stream import AlignedBuffer, RegionReader
    path = next(Path(args.offload_dir).glob(f"*-{args.scheme or 'none'}.mwoff"))
    raw = path.open("rb").read(_PREAMBLE.size)
    _, _, length, _ = _PREAMBLE.unpack(raw)
    with path.open("rb") as f:
        f.seek(_PREAMBLE.size)
        header = StoreHeader.from_json(f.read(length))
    reader = RegionReader(path)
    buffer = AlignedBuffer.allocate(header.layers[0].size)
    start = time.perf_counter()
    for region in header.layers:
        reader.read_into(region, buffer)
    seconds = time.perf_counter() - start
    total = sum(r.size for r in header.layers)
    return {"read_bandwidth": total / seconds, "bandwidth_direct": reader.direct}


def in_child(kind: str, args: argparse.Namespace, scheme: str | None) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--model", args.model, "--max-memory", args.max_memory,
               "--offload-dir", args.offload_dir, "--new-tokens", str(args.new_tokens),
               "--prompt-tokens", str(args.prompt_tokens), "--quantize", scheme or "none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{kind} ({scheme}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preset:opt-2.7b")
    parser.add_argument("--quantize", action="append", help="none, int8, int4, nf4 (repeatable; default none and int8)")
    parser.add_argument("--max-memory", default="2GiB")
    parser.add_argument("--offload-dir", default="/var/tmp/memwise-offload")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=5)
    parser.add_argument("--resident-limit", default="6GiB", help="also time decoding with every layer resident "
                        "(the compute bound; logits compared with the streamed run's) when the file + 1 GiB fits this")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.scheme = None if args.quantize[0] == "none" else args.quantize[0]
        handler = {"build": child_build, "run": child_run, "bandwidth": child_bandwidth,
                   "resident": child_resident}[args.child]
        print(json.dumps(handler(args)))
        return
    from memwise.offload.budget import parse_size
    budget = parse_size(args.max_memory)
    for scheme in args.quantize or ["none", "int8"]:
        row = {"model": args.model, "scheme": scheme, "max_memory": args.max_memory}
        row.update(in_child("build", args, scheme))
        # the disk is shared and virtual: its bandwidth is read before and after the run, and the larger
        # reading kept (other load can only lower a reading)
        before = in_child("bandwidth", args, scheme)
        row.update(in_child("run", args, scheme))
        after = in_child("bandwidth", args, scheme)
        row.update(max(before, after, key=lambda r: r["read_bandwidth"]))
        row["read_bandwidth_readings"] = [before["read_bandwidth"], after["read_bandwidth"]]
        row["decode_read_rate"] = row["bytes_read_per_token"] * row["decode_tok_s"]
        if row["file_bytes"] + 2**30 <= parse_size(args.resident_limit):
            row.update(in_child("resident", args, scheme))
        row["disk_bound_tok_s"] = row["read_bandwidth"] / max(row["bytes_read_per_token"], 1)
        row["peak_minus_base_over_budget"] = (row["peak_rss"] - row["base_rss"]) / budget
        print(json.dumps(row, indent=1), flush=True)
        mib = lambda n: f"{n / 2**20:,.0f} MiB"
        print(f"| {args.model} | {scheme} | {args.max_memory} | {mib(row['base_rss'])} | {mib(row['peak_rss'])} | "
              f"{mib(row['peak_rss'] - row['base_rss'])} | {row['decode_tok_s']:.3f} | "
              f"{row['bytes_read_per_token'] / 1e9:.2f} GB | {row['read_bandwidth'] / 1e9:.2f} GB/s | "
              f"{row['disk_bound_tok_s']:.3f} | {row['decode_tok_s'] / row['disk_bound_tok_s']:.2f} | "
              f"{row.get('resident_decode_tok_s', float('nan')):.3f} |", flush=True)


if __name__ == "__main__":
    main()
