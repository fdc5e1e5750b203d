"""Per-phase memory timeline of one 2-rank DDP / FSDP training run of benchmarks/finetune_memory.py.

Each gloo rank runs the harness's model, wrapping and AdamW, and records for each phase (build, wrap,
and per step: forward, backward, optimizer step, zero_grad) the resident set before it, its high-water
mark (VmHWM, reset through /proc/self/clear_refs at the phase start) and glibc's heap after it
(mallinfo2: heap extent, bytes in use, bytes free in the heap, mmapped chunks). It explains the
harness's per-rank rows; it is not a benchmark. Set MALLOC_MMAP_THRESHOLD_ in the environment to
compare with a fixed mmap threshold.

    PYTHONPATH=src python benchmarks/finetune_probe_dist.py gpt2 zero3
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_memory import MODELS, build_model, make_optimizer  # noqa: E402
from finetune_probe import _malloc, _reset_hwm, _status  # noqa: E402

MiB = 1 << 20


def _phase(rows: list, name: str, run) -> object:
    before = _status()["VmRSS"]
    _reset_hwm()
    result = run()
    heap = _malloc()
    rows.append({"phase": name, "rss_before": before / MiB, "hwm": _status()["VmHWM"] / MiB,
                 **{k: v / MiB for k, v in heap.items()}})
    return result


def _wrap(model, strategy: str):
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if strategy == "dp":
        return torch.nn.parallel.DistributedDataParallel(model)
    base = model.base_model
    layers = base.h if hasattr(base, "h") else base.decoder.layers if hasattr(base, "decoder") else base.layers
    mode = ShardingStrategy.FULL_SHARD if strategy == "zero3" else ShardingStrategy.SHARD_GRAD_OP
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={type(layers[0])})
    return FSDP(model, sharding_strategy=mode, auto_wrap_policy=policy, use_orig_params=True,
                device_id=torch.device("cpu"))


def _rank(rank: int, model_name: str, strategy: str, batch: int, seq: int, steps: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows: list = []
    config = MODELS[model_name]
    model = _phase(rows, "build", lambda: build_model(config))
    model = _phase(rows, "wrap", lambda: _wrap(model, strategy))
    opt = make_optimizer(model.parameters(), "adamw")
    ids = torch.randint(0, config["vocab_size"], (batch, seq))
    for step in range(steps):
        loss = _phase(rows, f"{step} forward", lambda: model(input_ids=ids, labels=ids).loss)
        _phase(rows, f"{step} backward", loss.backward)
        _phase(rows, f"{step} step", opt.step)
        _phase(rows, f"{step} zero_grad", lambda: opt.zero_grad(set_to_none=True))
    dist.barrier()
    out[rank] = rows
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("strategy", choices=("dp", "zero2", "zero3"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="the harness runs 3")
    args = parser.parse_args()
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(args.model, args.strategy, args.batch, args.seq, args.steps, 29000 + os.getpid() % 1000, out),
             nprocs=2, join=True)
    print(f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset (dynamic)')}")
    for rank in (0, 1):
        print(f"rank {rank}: phase, RSS before, HWM in phase, heap extent, heap in use, heap free, mmapped (MiB)")
        for r in out[rank]:
            print(f"  {r['phase']:<12} {r['rss_before']:8.1f} {r['hwm']:8.1f} {r['arena']:8.1f} "
                  f"{r['heap_in_use']:8.1f} {r['heap_free']:8.1f} {r['mmapped']:8.1f}")


if __name__ == "__main__":
    main()
