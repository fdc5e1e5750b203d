"""Where a training step's peak RSS comes from: a per-phase memory timeline of the harness's step.

Runs one configuration of benchmarks/finetune_memory.py (same model, optimizer, peft/ckpt setup) in
this process and prints, for each phase (build, and per step: forward, backward, optimizer step,
zero_grad), the resident set before it and its high-water mark (VmHWM, reset through
/proc/self/clear_refs at the phase start), glibc's heap bytes in use and free (mallinfo2), and the
bytes autograd saved for backward (saved_tensors_hooks; parameters and shared storages counted once
and apart). Numbers only explain the harness's rows; they are not a benchmark.

    PYTHONPATH=src python benchmarks/finetune_probe.py opt-350m "full adamw" --batch 2 --seq 128
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_memory import MODELS, RUNS, build_model, make_optimizer  # noqa: E402

MiB = 1 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _malloc() -> dict[str, int]:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"heap_in_use": info.uordblks, "heap_free": info.fordblks, "mmapped": info.hblkhd, "arena": info.arena}


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Timeline:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def phase(self, name: str, run) -> object:
        before = _status()["VmRSS"]
        _reset_hwm()
        result = run()
        after = _status()
        self.rows.append({"phase": name, "rss_before": before, "hwm": after["VmHWM"], "rss_after": after["VmRSS"],
                          **_malloc()})
        return result


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.base_model
    return inner.h if hasattr(inner, "h") else (inner.decoder.layers if hasattr(inner, "decoder") else inner.layers)


def _saved_bytes(model, loss_fn) -> tuple[object, dict[str, int]]:
    """Run loss_fn under a pack hook; bytes of distinct non-parameter storages autograd saved, and per
    decoder layer the saved bytes and the growth of glibc's heap (what the layer leaves resident)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" and not t.is_sparse:
            store = t.untyped_storage()
            ptr = store.data_ptr()
            if ptr not in params and ptr not in seen:
                seen[ptr] = store.nbytes()
        return t

    marks: list[tuple[int, int]] = []

    def mark(*_):
        marks.append((sum(seen.values()), _malloc()["arena"]))

    handles = [layer.register_forward_hook(mark) for layer in _decoder_layers(model)]
    handles.append(_decoder_layers(model)[0].register_forward_pre_hook(mark))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
    finally:
        for handle in handles:
            handle.remove()
    marks.sort()
    layers = len(marks) - 1
    per_layer = {"saved_per_layer": (marks[-1][0] - marks[0][0]) // max(layers, 1),
                 "heap_growth_per_layer": (marks[-1][1] - marks[0][1]) // max(layers, 1)}
    sizes = sorted(seen.values(), reverse=True)
    return loss, {"saved_bytes": sum(sizes), "saved_tensors": len(sizes), "largest_saved": sizes[:6], **per_layer}


def probe(name: str, label: str, batch: int, seq: int, steps: int, hooks: bool = True,
          drop_loss: bool = False) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    kw = dict(RUNS)[label]
    timeline = Timeline()
    start = _status()["VmRSS"]

    def build():
        model = build_model(MODELS[name])
        if kw.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if kw.get("method") == "lora":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0))
        return model

    model = timeline.phase("build", build)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, kw.get("optimizer", "adamw"))
    ids = torch.randint(0, MODELS[name]["vocab_size"], (batch, seq))
    saved: dict = {}
    first: dict = {}
    for step in range(steps):
        def forward():
            return model(input_ids=ids, labels=ids).loss

        loss, saved = timeline.phase(f"{step} forward", lambda: _saved_bytes(model, forward) if hooks else
                                     (forward(), saved))
        timeline.phase(f"{step} backward", loss.backward)
        if drop_loss:  # the harness's loop keeps it (and its graph's nodes) until the next forward ends
            del loss
        first = first or saved
        timeline.phase(f"{step} step", opt.step)
        timeline.phase(f"{step} zero_grad", lambda: opt.zero_grad(set_to_none=True))
    total = sum(p.numel() for p in model.parameters())
    return {"config": name, "run": label, "batch": batch, "seq": seq, "rss_at_start": start,
            "parameters": total, "trainable": sum(p.numel() for p in params), **saved,
            "first_step_heap_growth_per_layer": first.get("heap_growth_per_layer"), "timeline": timeline.rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=sorted(MODELS))
    parser.add_argument("run", choices=[label for label, _ in RUNS])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--drop-loss", action="store_true", help="del loss after backward (the harness keeps it)")
    parser.add_argument("--no-hooks", action="store_true", help="no saved-tensor or layer hooks (does counting move "
                        "the peak?)")
    args = parser.parse_args()
    result = probe(args.config, args.run, args.batch, args.seq, args.steps, not args.no_hooks, args.drop_loss)
    if args.json:
        print(json.dumps(result))
        return
    peak = max(r["hwm"] for r in result["timeline"])
    print(f"{result['config']} {result['run']} b{args.batch} s{args.seq}: P {result['parameters']:,} "
          f"T {result['trainable']:,}; start {result['rss_at_start'] / MiB:.1f} MiB; peak {peak / MiB:.1f} MiB")
    if "saved_bytes" in result:
        print(f"saved by autograd {result['saved_bytes'] / MiB:.1f} MiB in {result['saved_tensors']} storages, "
              f"largest {[round(b / MiB, 1) for b in result['largest_saved']]}")
    if "saved_per_layer" in result:
        print(f"per decoder layer: saved {result['saved_per_layer'] / MiB:.2f} MiB; heap growth in the forward "
              f"{result['first_step_heap_growth_per_layer'] / MiB:.2f} MiB (first step, fresh heap), "
              f"{result['heap_growth_per_layer'] / MiB:.2f} MiB (last step)")
    print(f"{'phase':14} {'rss before':>10} {'peak':>9} {'rss after':>10} {'heap used':>10} {'heap free':>10} "
          f"{'mmapped':>9}  (MiB)")
    for r in result["timeline"]:
        print(f"{r['phase']:14} {r['rss_before'] / MiB:10.1f} {r['hwm'] / MiB:9.1f} {r['rss_after'] / MiB:10.1f} "
              f"{r['heap_in_use'] / MiB:10.1f} {r['heap_free'] / MiB:10.1f} {r['mmapped'] / MiB:9.1f}")


if __name__ == "__main__":
    main()
