"""Issue 21's throughput figures in one run: memwise's offloaded block schedule against accelerate's
disk offload on the same model and tokens, and the plan's predicted throughput against the measured
one at several (budget, batch) points, with a plot of both.

Every cell runs in a fresh process. accelerate: benchmarks/accelerate_offload.py's cell (the synthetic
OPT checkpoint it writes, `device_map="auto"`, `max_memory`, `offload_folder`, float32). memwise: the
same checkpoint directory (or a preset) loaded with max_memory and offload_dir (the offload file is
written on first use, outside the timing), its plan solved for the cell's batch, prompt and new tokens
(memwise.offload.runtime: this machine's cached cost figures), then, as accelerate's cell does, one
warm-up generation of 1 token and one timed generation of N tokens of the same synthetic prompts
(torch.randint(4, 50000), seed 0; EOS ignored):

    tokens_per_s      batch x N / time of the N-token generation (prefill included, as FlexGen counts)
    predicted         the plan's tokens/s for that batch, prompt and N (prefill + decode)

    PYTHONPATH=src nice -n 10 python benchmarks/offload_throughput.py --out docs/results/DIR
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE, BUDGET, BATCH = "opt-1.3b", "2GiB", 32
HEADLINE = [None, "int8"]       # memwise's weight schemes against accelerate's float32
SWEEP = [("preset:opt-350m", budget, batch) for budget in ("512MiB", "1GiB", "1536MiB") for batch in (8, 32)]


def memwise_cell(source: str, max_memory: str, batch: int, prompt: int, new: int, offload_dir: str,
                 quantize: str | None = None) -> dict:
    import torch
    import memwise
    from memwise.bench.memory import peak_rss_bytes, reset_peak_rss

    start = time.perf_counter()
    model = memwise.load(source, max_memory=max_memory, offload_dir=offload_dir, quantize=quantize)
    load_s = time.perf_counter() - start
    peak_load = peak_rss_bytes()
    reset_peak_rss()        # a first load writes the offload file: its writer's memory is not the run's
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, min(50000, model.spec.vocab_size), (batch, prompt), generator=generator)
    model.generate(ids, 1, ignore_eos=True)
    stream = model.module.layer_stream
    read_before = stream.bytes_read
    begin = time.perf_counter()
    out = model.generate(ids, new, ignore_eos=True)
    seconds = time.perf_counter() - begin
    assert out.shape == (batch, prompt + new), out.shape
    runtime = model.module.offload_runtime
    run = runtime.last
    stream = model.module.layer_stream
    policy = run.policy
    return {"engine": "memwise", "source": source, "quantize": quantize or "float32", "batch_size": batch, "prompt_tokens": prompt, "new_tokens": new,
            "max_memory": max_memory, "load_s": load_s, "seconds_n": seconds, "tokens_per_s": batch * new / seconds,
            "predicted_tokens_per_s": policy.predicted_tokens_per_s if policy else None,
            "policy": policy.to_json() if policy else None, "no_plan_reason": run.reason,
            "resident_layers": run.resident_layers, "micro_batches": run.micro_batches,
            "micro_batch_size": run.micro_batch_size or batch,
            "disk_bytes_read": stream.bytes_read - (read_before if stream is model.module.layer_stream else 0),
            "peak_rss_bytes": peak_rss_bytes(), "peak_rss_load_bytes": peak_load,
            "prepare_s": runtime.prepare_s, "threads": torch.get_num_threads(), "first_tokens": out[:2, prompt:].tolist()}


def child(command: list[str]) -> dict:
    before = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"error": done.stderr.strip().splitlines()[-1:], "command": command}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average"] = [before, os.getloadavg()[0]]
    return result


def run_memwise(source: str, max_memory: str, batch: int, args, quantize: str | None = None) -> dict:
    cell = json.dumps([source, max_memory, batch, args.prompt_tokens, args.new_tokens, args.offload_dir, quantize])
    result = child([sys.executable, __file__, "--cell", cell])
    shown = result.get("predicted_tokens_per_s")
    print(f"memwise {source} {quantize or 'float32'} {max_memory} b{batch}: {result.get('tokens_per_s', float('nan')):.2f} tok/s, "
          f"predicted {shown if shown is None else round(shown, 2)}, micro-batches {result.get('micro_batches')}, "
          f"resident {result.get('resident_layers')}, peak RSS {result.get('peak_rss_bytes', 0) / 2**30:.2f} GiB", flush=True)
    return result


def plot(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [p for p in points if p.get("predicted_tokens_per_s")]
    labels = [f"{p['source'].split()[0].removeprefix('preset:')} {p.get('quantize', '')}\n{p['max_memory']} b{p['batch_size']}"
              for p in good]
    x = range(len(good))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(good)), 4))
    ax.bar([i - 0.2 for i in x], [p["predicted_tokens_per_s"] for p in good], 0.4, label="planned (memwise plan)")
    ax.bar([i + 0.2 for i in x], [p["tokens_per_s"] for p in good], 0.4, label="measured")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("tokens/s (prefill + decode)")
    ax.set_title("Offloaded block schedule: planned vs measured throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=BATCH, help="batch of the comparison with accelerate")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--offload-dir", default=str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                                     / "memwise" / "offload"))
    parser.add_argument("--remeasure-costs", action="store_true",
                        help="measure the cost figures now (into --out/costs.json) and plan with them: on a shared "
                             "machine, the figures then see the load the cells see")
    parser.add_argument("--skip-accelerate", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--out", required=False)
    parser.add_argument("--plot", default="docs/offload-throughput-planned-vs-measured.png")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(memwise_cell(*json.loads(args.cell))))
        return 0
    if args.remeasure_costs and args.out:
        from memwise.offload.costs import save_costs
        from memwise.offload.probes import measure_costs
        Path(args.offload_dir).mkdir(parents=True, exist_ok=True)
        costs_file = Path(args.out) / "costs.json"
        save_costs(measure_costs(Path(args.offload_dir)), costs_file)
        os.environ["MEMWISE_OFFLOAD_COSTS"] = str(costs_file.resolve())
        print(f"cost figures measured into {costs_file}", flush=True)
    sys.path.insert(0, str(HERE))
    import accelerate_offload
    directory = str(accelerate_offload.checkpoint(SHAPE))
    results: dict = {"command": sys.argv, "costs_file": os.environ.get("MEMWISE_OFFLOAD_COSTS", "this machine's cache"),
                     "headline": {"memwise": []}, "sweep": []}
    for quantize in HEADLINE:
        ours = run_memwise(directory, BUDGET, args.batch, args, quantize)
        ours["source"] = f"{SHAPE} (synthetic checkpoint)"
        results["headline"]["memwise"].append(ours)
    if not args.skip_accelerate:
        theirs = child([sys.executable, str(HERE / "accelerate_offload.py"), "--shape", SHAPE, "--max-memory", BUDGET,
                        "--cell", str(args.batch), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)])
        results["headline"]["accelerate"] = theirs
        print(f"accelerate {SHAPE} float32 {BUDGET} b{args.batch}: {theirs.get('tokens_per_s', float('nan')):.2f} tok/s, "
              f"peak RSS {theirs.get('peak_rss_bytes', 0) / 2**30:.2f} GiB", flush=True)
        for ours in results["headline"]["memwise"]:
            if "tokens_per_s" in theirs and "tokens_per_s" in ours:
                ours["over_accelerate"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
                print(f"memwise {ours['quantize']} / accelerate float32 = {ours['over_accelerate']:.2f}x", flush=True)
    if not args.skip_sweep:
        results["sweep"] = [run_memwise(source, b, n, args) for source, b, n in SWEEP]
    points = results["headline"]["memwise"] + results["sweep"]
    for p in points:
        if p.get("predicted_tokens_per_s"):
            p["measured_over_predicted"] = p["tokens_per_s"] / p["predicted_tokens_per_s"]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "offload-throughput.json").write_text(json.dumps(results, indent=1))
        plot(points, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
