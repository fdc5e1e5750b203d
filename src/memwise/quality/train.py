"""Train the reference model: a GPT-2-shaped byte-level model on the standard library's source.

    python -m memwise.quality.train [--minutes 20] [--out DIR]

Random weights make quantization-quality figures meaningless (every scheme looks perfect or
terrible), and no trained checkpoint can be downloaded here. This trains one on the CPU with plain
torch + transformers in a fixed time: GPT-2 architecture (n_embd 256, 4 layers, 4 heads, 256
positions, vocabulary 512 of which the 256 bytes are used; about 3.4 M parameters), AdamW, cosine
schedule, batches of 16 windows of 256 bytes, seeded. It writes a Hugging Face checkpoint
(config.json + model.safetensors) that memwise loads like any gpt2 directory, by default into
$XDG_CACHE_HOME/memwise/trained/stdlib-gpt2 (~/.cache when unset), and a train_log.json with the
losses.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

CONFIG = dict(n_embd=256, n_layer=4, n_head=4, n_positions=256, vocab_size=512, bos_token_id=0, eos_token_id=0,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
BATCH, WINDOW, PEAK_LR, WARMUP_STEPS = 16, 256, 1e-3, 100


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memwise" / "trained" / "stdlib-gpt2"


def train(out: Path, minutes: float, seed: int = 0, threads: int | None = None) -> dict:
    """Train for `minutes` on `threads` (torch's setting is restored after); the log of the run."""
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(out, minutes, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out: Path, minutes: float, seed: int) -> dict:
    import torch
    import transformers

    from memwise.quality.corpus import split, token_ids

    torch.manual_seed(seed)
    training, held_out = split()
    data = torch.tensor(token_ids(training), dtype=torch.long)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.1, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    deadline = time.monotonic() + minutes * 60
    # the schedule is laid over an estimate of the steps that fit, refreshed as steps are timed
    losses, step, started = [], 0, time.monotonic()
    estimated_steps = None
    while time.monotonic() < deadline:
        starts = torch.randint(0, len(data) - WINDOW - 1, (BATCH,), generator=generator)
        batch = torch.stack([data[s:s + WINDOW + 1] for s in starts.tolist()])
        if step >= 10:
            estimated_steps = int(step * minutes * 60 / (time.monotonic() - started))
        progress = min(1.0, step / estimated_steps) if estimated_steps else 0.0
        lr = PEAK_LR * min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).logits.reshape(-1, CONFIG["vocab_size"]),
                                               batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            print(f"step {step}  loss {sum(losses[-50:]) / 50:.3f}  lr {lr:.2e}  "
                  f"{(time.monotonic() - started) / 60:.1f} min", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    log = {"steps": step, "minutes": minutes, "tokens": step * BATCH * WINDOW, "config": CONFIG,
           "final_loss_mean_of_50": sum(losses[-50:]) / max(1, len(losses[-50:])), "losses": losses,
           "training_files": len(training), "held_out_files": len(held_out), "seed": seed}
    (out / "train_log.json").write_text(json.dumps(log))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or default_dir()
    log = train(out, args.minutes, args.seed, args.threads)
    print(f"wrote {out}: {log['steps']} steps, {log['tokens']:,} tokens, final loss {log['final_loss_mean_of_50']:.3f}")


if __name__ == "__main__":
    main()
