"""memwise estimate next to the estimators people use today, against measured peaks.

accelerate's `estimate-memory` counts the weights (inference: "Total Size") and, for training with
Adam, the largest of weights, gradients, optimizer states and the step (4x the float32 size); it
needs the hub for the model, so its own functions run here on an empty model built from the same
config. DeepSpeed's `estimate_zero2_model_states_mem_needs` / `estimate_zero3_...` count model states
per device (mixed-precision Adam: 2-byte weights and gradients, 16 bytes of optimizer state per
parameter, sharded by ZeRO), no offload. Neither counts activations or the framework. memwise's
figures and the measured peaks come from benchmarks/finetune_memory.py's JSON (same configs,
batch and sequence length) and from `memwise bench` records for inference.

    PYTHONPATH=src python benchmarks/estimator_peers.py docs/results/finetune/finetune_memory.json [more.json]
        [--bench docs/results/<run>/results.json] [--out docs/results/finetune/estimator_comparison.md]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from finetune_memory import MODELS, build_model, repredict  # noqa: E402  (the harness's own configs)

MiB = 2**20
# finetune_memory's row labels -> (method, devices) for the tools that have a formula for it
DEEPSPEED_STAGE = {"full adamw": ("zero2", 1), "ddp x2": ("zero2-as-ddp", 2), "fsdp shard_grad_op x2": ("zero2", 2),
                   "fsdp full_shard x2": ("zero3", 2)}


def accelerate_sizes(config: dict) -> tuple[int, int, int]:
    """(total bytes, largest layer bytes, training-with-Adam bytes) from accelerate's own functions."""
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import calculate_maximum_sizes, estimate_training_usage

    with init_empty_weights():
        model = build_model(config)
    total, largest = calculate_maximum_sizes(model)
    return int(total), int(largest[0]), int(max(estimate_training_usage(total, "float32").values()))


def deepspeed_per_device(stage: str, params: int, largest_params: int, devices: int) -> int | None:
    """Bytes per device of DeepSpeed's model-states estimator, no offload; None without deepspeed."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return None
    if stage == "zero3":
        return int(estimate_zero3_model_states_mem_needs(params, largest_params, devices, 1, False, False, False)[1])
    # DDP is ZeRO without partitioning: DeepSpeed's ZeRO-2 formula on one device
    gpus = 1 if stage == "zero2-as-ddp" else devices
    return int(estimate_zero2_model_states_mem_needs(params, gpus, 1, False)[1])


def finetune_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for result in results:
        for r in repredict(result)["rows"]:    # today's estimator on the saved measurements
            words = r["config"].split()
            model, rest = words[0], " ".join(words[1:])
            kind = " ".join(w for w in words[1:] if w != "rank0" and not (w[0] in "bs" and w[1:].isdigit()))
            # tiny models measure the framework, which none of the other tools counts: left out
            if model not in MODELS or kind not in DEEPSPEED_STAGE or "rank1" in rest or model.startswith("tiny"):
                continue
            total, largest, adam = accelerate_sizes(MODELS[model])
            stage, devices = DEEPSPEED_STAGE[kind]
            ds = deepspeed_per_device(stage, total // 4, largest // 4, devices)
            rows.append([model, f"train {rest.replace(' rank0', ' (rank 0)')}", _mib(r["measured"]),
                         _cell(r["predicted"], r["measured"]), _cell(adam if devices == 1 else None, r["measured"]),
                         _cell(ds, r["measured"])])
    return rows


def inference_rows(bench: dict) -> list[list[str]]:
    """Cells of a bench run (synthetic presets), predicted by today's estimator."""
    from memwise.estimate import estimate_inference

    rows = []
    for r in bench["results"]:
        if r.get("status") != "ok" or r.get("engine") not in ("memwise", "transformers") or r.get("quantize"):
            continue
        name = r["model"]
        config = MODELS.get(name)    # accelerate needs a transformers class: the harness's configs only
        weights = accelerate_sizes(config)[0] if config else None
        measured = max(r.get("peak_rss_bytes") or 0, r.get("load_peak_rss_bytes") or 0)
        predicted = estimate_inference(f"preset:{name}", batch_size=r["batch_size"], prompt_tokens=r["prompt_tokens"],
                                       new_tokens=r["new_tokens"], dtype=r["dtype"],
                                       engine=r["engine"]).predicted_peak_bytes
        rows.append([name, f"inference {r['engine']} b{r['batch_size']} p{r['prompt_tokens']} n{r['new_tokens']}",
                     _mib(measured), _cell(predicted, measured), _cell(weights, measured), "-"])
    return rows


def _mib(value: int) -> str:
    return f"{value / MiB:,.0f}"


def _cell(value: int | None, measured: int) -> str:
    if value is None:
        return "-"
    return f"{value / MiB:,.0f} ({(value - measured) / measured * 100:+.0f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("finetune_json", nargs="+")
    parser.add_argument("--bench", action="append", default=[], help="a memwise bench results.json (repeatable)")
    parser.add_argument("--out")
    args = parser.parse_args()
    results = [json.loads(Path(p).read_text()) for p in args.finetune_json]
    rows = finetune_rows(results)
    for bench in args.bench:
        rows += inference_rows(json.loads(Path(bench).read_text()))
    lines = ["| model | run | measured MiB | memwise estimate | accelerate estimate-memory | DeepSpeed model states |",
             "|---|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
