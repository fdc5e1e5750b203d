"""Measured peak memory of real training steps against `estimate_finetune`.

Each configuration runs in a fresh process (so peak RSS belongs to it alone): a transformers model
built from a config with random weights (no hub), 3 steps (--steps) of forward, backward, optimizer step and
zero_grad, with plain torch + transformers (+ peft for LoRA, + bitsandbytes for 8-bit AdamW), dropout
off (the estimate assumes it). The child reports ru_maxrss; the parent compares it with the estimate
on the memwise ModelSpec of the same config. Multi-device: DDP / FSDP on 2 CPU ranks over gloo, each
rank's own ru_maxrss against the per-device prediction.

    PYTHONPATH=src python benchmarks/finetune_memory.py --out results/finetune --configs tiny,gpt2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {  # memwise preset-style HF configs; dropout is switched off when built
    "tiny": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 256},
    "tiny-llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024},
    "gpt2-medium": {"model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16, "vocab_size": 50257,
                    "n_positions": 1024},
    "opt-350m": {"model_type": "opt", "hidden_size": 1024, "ffn_dim": 4096, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "vocab_size": 50272, "word_embed_proj_dim": 512,
                 "max_position_embeddings": 2048, "do_layer_norm_before": False},
    "opt-125m": {"model_type": "opt", "hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "vocab_size": 50272, "word_embed_proj_dim": 768,
                 "max_position_embeddings": 2048},
    "llama-100m": {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
                   "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 32000},
}
_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "dropout": 0.0, "attention_dropout": 0.0}

# (label, estimate kwargs); every model runs these
RUNS = [
    ("full adamw", {"method": "full", "optimizer": "adamw"}),
    ("full sgd", {"method": "full", "optimizer": "sgd"}),
    ("full adamw ckpt", {"method": "full", "optimizer": "adamw", "gradient_checkpointing": True}),
    ("lora adamw", {"method": "lora", "optimizer": "adamw"}),
    ("full adamw8bit", {"method": "full", "optimizer": "adamw8bit"}),
]
DIST_RUNS = [("ddp", {"strategy": "dp"}), ("fsdp shard_grad_op", {"strategy": "zero2"}),
             ("fsdp full_shard", {"strategy": "zero3"})]


def build_model(config: dict):
    import transformers

    kind = config["model_type"]
    cls = {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
           "opt": (transformers.OPTConfig, transformers.OPTForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[kind]
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf = cls[0](**fields, **{k: v for k, v in _NO_DROPOUT.items() if hasattr(cls[0](), k)})
    return cls[1](hf).train()


def make_optimizer(params, name: str):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    raise ValueError(name)


def train_steps(model, opt, batch: int, seq: int, vocab: int, steps: int = 3) -> None:
    import torch

    ids = torch.randint(0, vocab, (batch, seq))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def child(job: dict) -> dict:
    """One configuration, in this (fresh) process; returns the peak RSS in bytes."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if job.get("baseline"):
        import transformers  # noqa: F401 - the baseline is the process with the libraries imported
        return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    model = build_model(job["config"])
    kw = job["kwargs"]
    if kw.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if kw.get("method") == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=kw.get("lora_rank", 8), lora_alpha=16, lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, kw.get("optimizer", "adamw"))
    train_steps(model, opt, job["batch"], job["seq"], job["vocab"], job.get("steps", 3))
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def heap_mib() -> dict:
    """glibc's malloc totals now (mallinfo2): heap extent, its bytes in use and free, and mmapped chunks."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    try:
        call = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return {}
    call.restype = MallInfo2
    info = call()
    return {"heap": round(info.arena / 2**20, 1), "heap_in_use": round(info.uordblks / 2**20, 1),
            "heap_free": round(info.fordblks / 2**20, 1), "mmapped": round(info.hblkhd / 2**20, 1)}


def _rank(rank: int, job: dict, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = build_model(job["config"])
    block = type(model.base_model.h[0] if hasattr(model.base_model, "h") else
                 (model.base_model.decoder.layers if hasattr(model.base_model, "decoder") else model.base_model.layers)[0])
    strategy = job["kwargs"]["strategy"]
    if strategy == "dp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        mode = ShardingStrategy.FULL_SHARD if strategy == "zero3" else ShardingStrategy.SHARD_GRAD_OP
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={block})
        model = FSDP(model, sharding_strategy=mode, auto_wrap_policy=policy, use_orig_params=True,
                     device_id=torch.device("cpu"))
    opt = make_optimizer(model.parameters(), "adamw")
    train_steps(model, opt, job["batch"], job["seq"], job["vocab"], job.get("steps", 3))
    dist.barrier()
    results[rank] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, heap_mib())
    dist.destroy_process_group()


def dist_child(job: dict) -> dict:
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_rank, args=(job, 29500 + os.getpid() % 1000, results), nprocs=2, join=True)
    return {"peak_rss_per_rank": [results[0][0], results[1][0]], "heap_mib_per_rank": [results[0][1], results[1][1]]}


def run_child(job: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", handle.name], capture_output=True, text=True,
                             timeout=1800)
    finally:
        os.unlink(handle.name)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict(config: dict, kwargs: dict, batch: int, seq: int):
    from memwise.estimate.finetune import estimate_finetune
    from memwise.source import family_and_spec

    _, spec = family_and_spec(dict(config), "benchmark")
    return estimate_finetune(spec, batch_size=batch, seq_len=seq, **kwargs)


def parse_label(label: str) -> tuple[str, dict, int, int]:
    """A row's config label ("gpt2 fsdp full_shard x2 rank0 b2 s128") -> (model, estimate kwargs, batch, seq)."""
    words = label.split()
    batch, seq = int(words[-2][1:]), int(words[-1][1:])
    kind = " ".join(w for w in words[1:-2] if w != "x2" and not w.startswith("rank"))
    dist = dict(DIST_RUNS)
    kwargs = {"devices": 2, **dist[kind]} if kind in dist else dict(dict(RUNS)[kind])
    return words[0], kwargs, batch, seq


def repredict(result: dict) -> dict:
    """The same measurements with today's estimator's predictions (rows of models the harness knows)."""
    rows = []
    for r in result["rows"]:
        model, kwargs, batch, seq = parse_label(r["config"])
        predicted = predict(MODELS[model], kwargs, batch, seq).predicted_peak_bytes
        rows.append(_row(r["config"], predicted, r["measured"]) | ({"distributed": True} if r.get("distributed") else {}))
    return {**result, "rows": rows}


def _row(label: str, predicted: int, measured: int) -> dict:
    error = 100.0 * (predicted - measured) / measured
    return {"config": label, "predicted": predicted, "measured": measured, "error_pct": round(error, 2)}


def run_all(models: list[str], batch: int, seq: int, dist: bool, lora_ok: bool, bnb_ok: bool,
            single: bool = True, strategies: tuple[str, ...] | list[str] = ("dp", "zero2", "zero3"),
            steps: int = 3) -> dict:
    baseline = run_child({"baseline": True})["peak_rss"]
    rows, skipped = [], []
    for name in models:
        config = MODELS[name]
        vocab = config["vocab_size"]
        for label, kwargs in RUNS if single else ():
            why = ("peft not installed" if kwargs["method"] == "lora" and not lora_ok else
                   "bitsandbytes' CPU AdamW8bit unavailable" if kwargs["optimizer"] == "adamw8bit" and not bnb_ok
                   else None)
            if why:
                skipped.append(f"{name} {label}: {why}")
                continue
            got = run_child({"config": config, "kwargs": kwargs, "batch": batch, "seq": seq, "vocab": vocab,
                             "steps": steps})
            if "error" in got:
                skipped.append(f"{name} {label}: {got['error']}")
                continue
            est = predict(config, kwargs, batch, seq)
            rows.append(_row(f"{name} {label} b{batch} s{seq}", est.predicted_peak_bytes, got["peak_rss"]))
            print(rows[-1], flush=True)
        for label, kwargs in [(lab, kw) for lab, kw in DIST_RUNS if kw["strategy"] in strategies] if dist else ():
            got = run_child({"config": config, "kwargs": kwargs, "batch": batch, "seq": seq, "vocab": vocab,
                             "dist": True, "steps": steps})
            if "error" in got:
                skipped.append(f"{name} {label}: {got['error']}")
                continue
            est = predict(config, {"devices": 2, **kwargs}, batch, seq)
            for rank, measured in enumerate(got["peak_rss_per_rank"]):
                rows.append(_row(f"{name} {label} x2 rank{rank} b{batch} s{seq}", est.predicted_peak_bytes,
                                 measured) | {"distributed": True, "heap_mib_at_end": got["heap_mib_per_rank"][rank]})
                print(rows[-1], flush=True)
    return {"baseline_bytes": baseline, "rows": rows, "skipped": skipped, "steps": steps,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def markdown(result: dict) -> str:
    lines = ["| config | predicted MiB | measured MiB | error % |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['predicted'] / 2**20:.1f} | {r['measured'] / 2**20:.1f} | "
                     f"{r['error_pct']:+.1f} |")
    single = [abs(r["error_pct"]) for r in result["rows"] if not r.get("distributed")]
    multi = [abs(r["error_pct"]) for r in result["rows"] if r.get("distributed")]
    lines.append("")
    if single:
        lines.append(f"one process: median |error| {statistics.median(single):.1f}% over {len(single)} runs")
    if multi:
        lines.append(f"2 ranks (per rank): median |error| {statistics.median(multi):.1f}% over {len(multi)} rows")
    for model in sorted({r["config"].split()[0] for r in result["rows"]}):
        errors = [abs(r["error_pct"]) for r in result["rows"] if r["config"].split()[0] == model]
        lines.append(f"{model}: median |error| {statistics.median(errors):.1f}% over {len(errors)} rows")
    lines.append(f"baseline (python + torch + transformers imported): {result['baseline_bytes'] / 2**20:.1f} MiB")
    lines += [f"skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def _available(module: str) -> bool:
    probe = {"peft": "import peft",
             "bitsandbytes": "import torch, bitsandbytes as b; p=torch.nn.Parameter(torch.zeros(8192)); "
                             "p.grad=torch.ones(8192); o=b.optim.AdamW8bit([p]); o.step()"}[module]
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--out", default="finetune-memory")
    parser.add_argument("--configs", default="tiny,gpt2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (FSDP's heap needs ~5)")
    parser.add_argument("--no-dist", action="store_true")
    parser.add_argument("--only-dist", action="store_true", help="skip the one-process rows")
    parser.add_argument("--strategies", default="dp,zero2,zero3", help="the 2-rank runs to do (dp, zero2, zero3)")
    parser.add_argument("--render", help="rewrite the markdown table from a saved finetune_memory.json")
    parser.add_argument("--repredict", action="store_true", help="with --render: today's estimator's predictions")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        print(markdown(repredict(saved) if args.repredict else saved))
        return
    if args.child:
        job = json.loads(Path(args.child).read_text())
        print(json.dumps(dist_child(job) if job.get("dist") else child(job)))
        return
    result = run_all(args.configs.split(","), args.batch, args.seq, not args.no_dist, _available("peft"),
                     _available("bitsandbytes"), single=not args.only_dist,
                     strategies=args.strategies.split(","), steps=args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "finetune_memory.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
