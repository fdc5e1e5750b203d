"""A model whose weights exceed this machine's RAM, run under a small budget, its tokens checked.

    PYTHONPATH=src python benchmarks/offload_larger_than_ram.py --model preset:opt-6.7b \
        --max-memory 4GiB --offload-dir /var/tmp/memwise-bigdemo

opt-6.7b in float32 is 26.8 GB of weights (synthetic: the preset's seeded random weights). Each step
runs in its own fresh process:

1. write: `memwise.load(..., max_memory, offload_dir)` writes the offload file once (under `nice`;
   its wall time and peak RSS are reported; skipped when a valid file is already there);
2. bandwidth: the O_DIRECT read bandwidth of the file's layer regions (before and after the run, the
   larger reading kept: other load on a shared disk only lowers a reading);
3. run: load under the budget (the CRC pass over the file included) and generate --new-tokens greedy
   tokens after a --prompt-tokens prompt at batch 1: TTFT, prefill and decode tok/s, bytes read per
   token, peak RSS (VmHWM) against the budget plus the base (RSS after importing torch, memwise and
   the planner's solver, scipy.optimize, and building the empty, meta-device model);
4. reference: the same sequence, teacher-forced, through a plain PyTorch OPT written here from the
   architecture's definition (not memwise's modules, cache or streaming), its weights regenerated
   tensor by tensor from the preset's seed and applied one layer at a time to the whole sequence;
   argmax at each position must equal the token the streamed run generated;
5. plan: `memwise plan MODEL --max-memory --batch 1 --json` (this machine's cached cost figures).

Batch 1 only (benchmarks/offload_throughput.py measures the block schedule at larger batches).
Figures print as a table and go to --out (results.json, results.md); the offload file is deleted at
the end unless --keep.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs/results/2026-12-05-amd-epyc-zen5-larger-than-ram"
BANDWIDTH_LAYERS = 8    # layer regions read per bandwidth reading (6.4 GB for opt-6.7b float32)


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def store_file(args: argparse.Namespace) -> Path:
    from memwise.offload.files import store_path
    return store_path(Path(args.offload_dir), args.model, "float32", "none")


def child_write(args: argparse.Namespace) -> dict:
    import torch
    import memwise
    from memwise.models.decoder.build import meta_model
    from memwise.source import resolve_model
    meta_model(resolve_model(args.model).spec, torch.float32)
    base = vm("VmRSS")
    start = time.perf_counter()
    model = memwise.load(args.model, max_memory=args.max_memory, offload_dir=args.offload_dir)
    return {"write_s": time.perf_counter() - start, "write_base_rss": base, "write_peak_rss": vm("VmHWM"),
            "file_bytes": model.module.offload.path.stat().st_size}


def child_bandwidth(args: argparse.Namespace) -> dict:
    from memwise.offload.store import _PREAMBLE, StoreHeader
    from memwise.offload.stream import AlignedBuffer, RegionReader
    path = store_file(args)
    with path.open("rb") as f:
        _, _, length, _ = _PREAMBLE.unpack(f.read(_PREAMBLE.size))
        header = StoreHeader.from_json(f.read(length))
    reader = RegionReader(path)
    buffer = AlignedBuffer.allocate(header.layers[0].size)
    # layers spread over the file: a reading of one end of a virtual disk is not the whole
    regions = header.layers[::max(1, len(header.layers) // BANDWIDTH_LAYERS)][:BANDWIDTH_LAYERS]
    start = time.perf_counter()
    for region in regions:
        reader.read_into(region, buffer)
    seconds = time.perf_counter() - start
    return {"read_bandwidth": sum(r.size for r in regions) / seconds, "bandwidth_direct": reader.direct}


def child_run(args: argparse.Namespace) -> dict:
    import torch
    import memwise
    from memwise.models.decoder.build import meta_model
    from memwise.source import resolve_model
    meta_model(resolve_model(args.model).spec, torch.float32)
    import scipy.optimize  # noqa: F401 (the planner's solver: part of the runtime's base)
    base = vm("VmRSS")
    start = time.perf_counter()
    model = memwise.load(args.model, max_memory=args.max_memory, offload_dir=args.offload_dir)
    load_s = time.perf_counter() - start
    prompt = torch.arange(10, 10 + args.prompt_tokens)[None]
    times, reads, tokens = [], [], []
    start = time.perf_counter()
    for step in model.stream(prompt, args.new_tokens, ignore_eos=True):
        times.append(time.perf_counter() - start)
        # the stream of the generation's plan (the runtime replaces the load's when the plan keeps
        # another number of layers resident)
        reads.append(model.module.layer_stream.bytes_read)
        tokens.append(int(step[0]))
    decode_s = times[-1] - times[0]
    plan = model.module.offload.plan
    resident = model.module.offload_runtime.last.resident_layers
    return {"base_rss": base, "peak_rss": vm("VmHWM"), "load_s": load_s, "ttft_s": times[0],
            "prefill_tok_s": args.prompt_tokens / times[0], "decode_s": decode_s,
            "decode_tok_s": (len(times) - 1) / decode_s,
            # reads run ahead by the buffers' depth; whole passes between first and last token even it out
            "bytes_read_per_token": (reads[-1] - reads[0]) / (len(reads) - 1),
            "prompt": prompt[0].tolist(), "tokens": tokens,
            "plan": f"{plan.describe()}; the generation's plan: {resident} resident",
            "resident_layers": resident, "streamed_layers": plan.num_layers - resident,
            "fallback_reason": model.module.offload.fallback_reason}


def _layer_norm(x, tensors: dict, prefix: str, eps: float):
    import torch
    return torch.nn.functional.layer_norm(x, x.shape[-1:], tensors[f"{prefix}.weight"], tensors[f"{prefix}.bias"], eps)


def _opt_layer(x, t: dict, heads: int, eps: float):
    """One pre-norm OPT decoder layer over the whole sequence, attention written out (causal softmax)."""
    import torch
    length, hidden = x.shape
    head_dim = hidden // heads
    h = _layer_norm(x, t, "attn_norm", eps)
    q, k, v = (h @ t["attn.qkv.weight"].T + t["attn.qkv.bias"]).split(hidden, dim=-1)
    q, k, v = (m.view(length, heads, head_dim).transpose(0, 1) for m in (q, k, v))
    scores = (q @ k.transpose(1, 2)) / head_dim ** 0.5
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    attention = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
    x = x + attention.transpose(0, 1).reshape(length, hidden) @ t["attn.out.weight"].T + t["attn.out.bias"]
    h = _layer_norm(x, t, "mlp_norm", eps)
    up = torch.relu(h @ t["mlp.up.weight"].T + t["mlp.up.bias"])
    return x + up @ t["mlp.down.weight"].T + t["mlp.down.bias"]


def child_reference(args: argparse.Namespace) -> dict:
    """Teacher-forced argmax of a plain float32 OPT over prompt + generated tokens, the weights
    regenerated one tensor at a time (the preset's seeded draws, in the model's parameter order)."""
    import torch
    from memwise.models.decoder.build import synthetic_tensors
    from memwise.source import resolve_model
    run = json.loads(Path(args.run_json).read_text())
    spec = resolve_model(args.model).spec
    assert spec.model_type == "opt" and spec.pre_norm and spec.tie_word_embeddings, "the reference is a pre-norm OPT"
    ids = torch.tensor(run["prompt"] + run["tokens"][:-1])
    layer_tensors: dict[str, torch.Tensor] = {}
    current, x, embed, final = None, None, None, {}

    def apply_layer() -> None:
        nonlocal x
        x = _opt_layer(x, layer_tensors, spec.num_heads, spec.norm_eps)
        layer_tensors.clear()

    with torch.no_grad():
        for name, tensor in synthetic_tensors(spec, 0):
            if name == "embed.weight":
                embed = tensor
            elif name == "positions.weight":
                # memwise's table is OPT's without its two unused leading rows (a checkpoint's are
                # skipped at load), so row p is position p
                x = embed[ids] + tensor[torch.arange(len(ids))]
            elif name.startswith("layers."):
                _, index, local = name.split(".", 2)
                if current is not None and int(index) != current:
                    apply_layer()
                current = int(index)
                layer_tensors[local] = tensor
            else:
                final[name.removeprefix("norm.")] = tensor
        apply_layer()
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], final["weight"], final["bias"], spec.norm_eps)
        logits = (x @ embed.T)[len(run["prompt"]) - 1:]
    top2 = logits.topk(2, dim=-1)
    return {"reference_tokens": top2.indices[:, 0].tolist(),
            "reference_margin_min": float((top2.values[:, 0] - top2.values[:, 1]).min()),
            "reference_logit_std": float(logits.std()), "reference_peak_rss": vm("VmHWM")}


def in_child(kind: str, args: argparse.Namespace, nice: bool = False, extra: list[str] = ()) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--model", args.model, "--max-memory", args.max_memory,
               "--offload-dir", args.offload_dir, "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), *extra]
    if nice:
        command = ["nice", "-n", "10", *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {kind} ...", file=sys.stderr, flush=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def plan_prediction(args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "memwise.cli", "plan", args.model, "--max-memory", args.max_memory, "--batch", "1",
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return {"plan_error": result.stderr.strip()[-500:]}
    raw = json.loads(result.stdout)
    policy = raw.get("policy", raw)
    return {"plan_command": " ".join(["memwise", *command[3:]]), "plan_policy": policy,
            "plan_disk_read_bytes_per_s": raw.get("costs", {}).get("disk_read_bytes_per_s")}


def measure(args: argparse.Namespace) -> dict:
    from memwise.offload.budget import parse_size
    row = {"model": args.model, "dtype": "float32", "max_memory": args.max_memory,
           "budget_bytes": parse_size(args.max_memory), "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "batch_size": 1}
    if store_file(args).exists():
        row["write"] = "skipped: the offload file was already there"
    else:
        row.update(in_child("write", args, nice=True))
    before = in_child("bandwidth", args)
    run = in_child("run", args)
    after = in_child("bandwidth", args)
    row.update(run)
    row.update(max(before, after, key=lambda r: r["read_bandwidth"]))
    row["read_bandwidth_readings"] = [before["read_bandwidth"], after["read_bandwidth"]]
    row["file_bytes"] = store_file(args).stat().st_size
    run_json = Path(args.out) / "run-tokens.json"
    run_json.write_text(json.dumps({"prompt": run["prompt"], "tokens": run["tokens"]}))
    row.update(in_child("reference", args, nice=True, extra=["--run-json", str(run_json)]))
    run_json.unlink()
    row["tokens_equal_reference"] = row["reference_tokens"] == row["tokens"]
    row["disk_bound_tok_s"] = row["read_bandwidth"] / max(row["bytes_read_per_token"], 1)
    row["peak_minus_base"] = row["peak_rss"] - row["base_rss"]
    row.update(plan_prediction(args))
    return row


def report(row: dict, command: str) -> str:
    gib, mib = (lambda n: f"{n / 2**30:.2f} GiB"), (lambda n: f"{n / 2**20:,.0f} MiB")
    policy = row.get("plan_policy", {})
    lines = [f"# {row['model']} (float32, synthetic weights) under --max-memory {row['max_memory']}", "",
             f"`{command}`, {row['date']}, {row['machine']} (RAM {gib(row['ram_bytes'])}), commit {row['commit']}.", "",
             f"- offload file: {row['file_bytes'] / 1e9:.1f} GB, larger than the machine's RAM; plan: {row['plan']}"
             + (f"; reads fell back: {row['fallback_reason']}" if row["fallback_reason"] else "; O_DIRECT reads"),
             f"- first write: " + (f"{row['write_s']:.0f} s, peak RSS {mib(row['write_peak_rss'])}" if "write_s" in row
                                   else row["write"]),
             f"- load (header + CRC pass over the whole file): {row['load_s']:.1f} s",
             f"- tokens: {row['tokens']}; reference (plain PyTorch OPT, layer by layer, teacher-forced): "
             f"{row['reference_tokens']}: {'equal' if row['tokens_equal_reference'] else 'DIFFERENT'} "
             f"(smallest top-1/top-2 logit gap {row['reference_margin_min']:.3g}, logit std {row['reference_logit_std']:.3g})",
             "", "| figure | measured | `memwise plan` | disk-read bound |", "|---|---:|---:|---:|",
             f"| TTFT ({row['prompt_tokens']}-token prompt) | {row['ttft_s']:.1f} s | "
             f"{policy.get('predicted_prefill_s', float('nan')):.1f} s | |",
             f"| prefill tok/s | {row['prefill_tok_s']:.3f} | | |",
             f"| decode tok/s (batch 1) | {row['decode_tok_s']:.3f} | "
             f"{policy.get('predicted_decode_tokens_per_s', float('nan')):.3f} | {row['disk_bound_tok_s']:.3f} |",
             f"| bytes read per decoded token | {row['bytes_read_per_token'] / 1e9:.2f} GB | "
             f"{policy.get('disk_bytes_per_token', float('nan')) / 1e9:.2f} GB | |",
             f"| O_DIRECT read bandwidth (larger of before/after) | {row['read_bandwidth'] / 1e9:.2f} GB/s | "
             f"{(row.get('plan_disk_read_bytes_per_s') or float('nan')) / 1e9:.2f} GB/s (cached figure) | |",
             f"| peak RSS | {mib(row['peak_rss'])} | {mib(policy.get('predicted_peak_bytes', 0))} | |",
             f"| peak RSS - base ({mib(row['base_rss'])}) | {mib(row['peak_minus_base'])} of "
             f"{mib(row['budget_bytes'])} budget | | |",
             "", "Batch 1 only: benchmarks/offload_throughput.py measures the block schedule at larger batches."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preset:opt-6.7b")
    parser.add_argument("--max-memory", default="4GiB")
    parser.add_argument("--offload-dir", default="/var/tmp/memwise-bigdemo")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--keep", action="store_true", help="keep the offload file (deleted by default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        handler = {"write": child_write, "bandwidth": child_bandwidth, "run": child_run,
                   "reference": child_reference}[args.child]
        print(json.dumps(handler(args)))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=src python benchmarks/offload_larger_than_ram.py " + " ".join(sys.argv[1:])
    try:
        row = measure(args)
    finally:
        if not args.keep:
            path = store_file(args)
            for stale in [path, *path.parent.glob(f"{path.name}.tmp-*")]:
                stale.unlink(missing_ok=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    row.update({"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                "commit": commit.stdout.strip(), "command": command, "python": platform.python_version()})
    (Path(args.out) / "results.json").write_text(json.dumps(row, indent=1) + "\n")
    text = report(row, command)
    (Path(args.out) / "results.md").write_text(text)
    print(text)
    if not row["tokens_equal_reference"]:
        raise SystemExit("the streamed tokens differ from the reference")


if __name__ == "__main__":
    main()
