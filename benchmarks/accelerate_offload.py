"""The baseline of issue 21: transformers + accelerate disk offload (`device_map="auto"`, `max_memory`,
`offload_folder`), the way most people run a model larger than their memory.

An OPT checkpoint with synthetic weights (transformers' OPTForCausalLM(config) after
torch.manual_seed(0), float32, save_pretrained) is written once under
$XDG_CACHE_HOME/memwise/bench/opt-<shape>-synthetic (~/.cache when unset). Each cell (one batch size)
runs in a fresh process: load with the memory budget (accelerate writes the weights that do not fit
to the offload folder), one warm-up generation of 1 token, then generations of 1 and of N new tokens
with synthetic prompts of exact length (EOS ignored). It reports:

    tokens_per_s          batch x N / time of the N-token generation (prefill included, as FlexGen counts)
    decode_tokens_per_s   batch x (N - 1) / (time of N tokens - time of 1 token)
    peak_rss_bytes        the child's ru_maxrss (load and generation)

accelerate reads offloaded weights through numpy memory maps, so the page cache may hold them between
steps when the machine has memory free: its figures are then better than a disk's.

    PYTHONPATH=src python benchmarks/accelerate_offload.py --shape opt-1.3b --max-memory 2GiB \
        --batch 1 32 --prompt-tokens 8 --new-tokens 4
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # facebook/opt-* configs' shapes
    "opt-tiny": {"hidden_size": 256, "ffn_dim": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
    "opt-1.3b": {"hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24, "num_attention_heads": 32},
    "opt-2.7b": {"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32},
}


def checkpoint(shape: str) -> Path:
    """The synthetic checkpoint's directory, written (to a temporary name, then renamed) if missing."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memwise" / "bench"
    target = base / f"{shape}-synthetic"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    base.mkdir(parents=True, exist_ok=True)
    config = OPTConfig(**SHAPES[shape], word_embed_proj_dim=SHAPES[shape]["hidden_size"], vocab_size=50272,
                       max_position_embeddings=2048, do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = OPTForCausalLM(config).float().eval()
    partial = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=base))
    model.save_pretrained(partial)
    os.replace(partial, target)
    return target


def cell(directory: Path, max_memory: str, batch: int, prompt_tokens: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="accelerate-offload-", dir=directory.parent) as offload:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(directory, device_map="auto", max_memory={"cpu": max_memory},
                                                     offload_folder=offload, dtype=torch.float32)
        load_s = time.perf_counter() - start
        placement = sorted({str(v) for v in model.hf_device_map.values()})
        disk_modules = sum(1 for v in model.hf_device_map.values() if v == "disk")
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(4, 50000, (batch, prompt_tokens), generator=generator)
        mask = torch.ones_like(ids)

        def run(n: int) -> float:
            begin = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            assert out.shape == (batch, prompt_tokens + n), out.shape
            return time.perf_counter() - begin

        run(1)
        one, full = run(1), run(new_tokens)
    return {"batch_size": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "max_memory": max_memory,
            "load_s": load_s, "placement": placement, "disk_modules": disk_modules, "seconds_1": one,
            "seconds_n": full, "tokens_per_s": batch * new_tokens / full,
            "decode_tokens_per_s": batch * (new_tokens - 1) / (full - one) if full > one else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="opt-1.3b")
    parser.add_argument("--max-memory", default="2GiB")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--out", help="write the cells as JSON here")
    parser.add_argument("--cell", type=int, help=argparse.SUPPRESS)   # the child: one batch size
    args = parser.parse_args()
    directory = checkpoint(args.shape)
    if args.cell is not None:
        print(json.dumps(cell(directory, args.max_memory, args.cell, args.prompt_tokens, args.new_tokens)))
        return 0
    results = []
    for batch in args.batch:
        command = [sys.executable, __file__, "--shape", args.shape, "--max-memory", args.max_memory, "--cell",
                   str(batch), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            results.append({"batch_size": batch, "error": child.stderr.strip().splitlines()[-1:]})
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{args.shape} batch {batch}: {result['tokens_per_s']:.3f} tokens/s (decode "
              f"{result['decode_tokens_per_s'] or float('nan'):.3f}), peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"{result['disk_modules']} modules on disk, load {result['load_s']:.1f} s", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"shape": args.shape, "command": sys.argv, "cells": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
