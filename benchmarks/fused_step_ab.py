"""Milliseconds per decode step of a BitNet or quantized decoder preset: the fused C step against the
PyTorch modules (each product a C call, torch for the rest).

Both run in this one process, in alternating rounds over the same cache length, so that the
minute-to-minute drift of a shared machine hits both alike:

    PYTHONPATH=src python benchmarks/fused_step_ab.py gpt2-medium --quantize int4 --rounds 5 --steps 20 [--threads 2]
    PYTHONPATH=src python benchmarks/fused_step_ab.py bitnet-b1.58-large --rounds 5 --steps 20 [--threads 1]

"fused" is the default (one C call for all layers). "unfused" is, for a quantized decoder,
MEMWISE_FUSED_STEP=0, and for BitNet the backend "c-unfused" (the C products one TernaryProjection
at a time). Each round prefills a 128-token prompt, then times `steps` single-token steps (embedding,
final norm and the lm_head included in both); rounds alternate which goes first. Prints each
one's rounds and median, and the median of the per-round ratios.

`--against PATH` compares this build's fused step with another build's instead: PATH is that
build's extension (e.g. a copy of main's src/memwise/models/bitnet/_step.cpython-*.so), loaded beside
this one's; the model's structs must be the same in both.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import time
from typing import Callable

import torch

import memwise
from memwise.models import bitnet
from memwise.models.bitnet.modules import BitNetForCausalLM
from memwise.source import resolve_model


def use_fused(model, fused: bool) -> None:
    """Turns the fused step on or off: BitNet by its backend, a quantized decoder by the environment."""
    if isinstance(model, BitNetForCausalLM):
        model.backend = "auto" if fused else "c-unfused"
    else:
        os.environ["MEMWISE_FUSED_STEP"] = "1" if fused else "0"


def variants(model, against: str | None) -> dict[str, Callable[[], None]]:
    """name -> what turns that variant on, the baseline first: unfused and fused, or with `against`
    (another build's extension file) that build's fused step and this one's."""
    if against is None:
        return {"unfused": lambda: use_fused(model, False), "fused": lambda: use_fused(model, True)}
    fused_step = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".fused_step")
    spec = importlib.util.spec_from_file_location("other_build._step", against)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)

    def select(extension) -> Callable[[], None]:
        def run() -> None:
            use_fused(model, True)
            fused_step._step = extension
            model._fused_decoder = None    # made again at the next step, over `extension`
        return run
    return {"other build": select(other), "this build": select(fused_step._step)}


def time_steps(model, select: Callable[[], None], prompt: torch.Tensor, steps: int) -> float:
    """Mean ms per decode step after a prefill of `prompt`, with the variant `select` turns on."""
    select()
    cache = model.new_cache(1, prompt.shape[1] + steps + 4)
    token = torch.tensor([[5]])
    model(prompt, cache, last_only=True)
    for _ in range(2):
        model(token, cache, last_only=True)
    start = time.perf_counter()
    for _ in range(steps):
        model(token, cache, last_only=True)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--quantize", default=None, choices=("int8", "int4"),
                        help="a decoder's scheme (default int4); BitNet presets take none")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch / C threads (0: torch's default)")
    parser.add_argument("--against", metavar="PATH",
                        help="another build's _step extension: its fused step against this one's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    source = f"preset:{args.preset}"
    if resolve_model(source).family is bitnet:
        if args.quantize:
            raise SystemExit(f"{args.preset} is a BitNet model: --quantize does not apply")
    else:
        args.quantize = args.quantize or "int4"
    model = memwise.load(source, quantize=args.quantize).module
    prompt = torch.randint(0, model.spec.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    selects = variants(model, args.against)
    times: dict[str, list[float]] = {name: [] for name in selects}
    with torch.inference_mode():
        for r in range(args.rounds):
            for name in (list(selects) if r % 2 == 0 else list(selects)[::-1]):
                times[name].append(time_steps(model, selects[name], prompt, args.steps))
    if not model._fused_decoder:
        raise SystemExit(f"{args.preset} {args.quantize or ''} has no fused step: nothing to compare")
    print(f"{args.preset} {args.quantize or 'ternary'}, {torch.get_num_threads()} threads, prompt {args.prompt}, "
          f"{args.steps} steps x {args.rounds} rounds")
    for name, values in times.items():
        print(f"  {name:11s} median {statistics.median(values):7.2f} ms/step  rounds {[round(v, 2) for v in values]}")
    base, new = times.values()
    print(f"  {list(times)[1]} speed-up {statistics.median(b / n for b, n in zip(base, new)):.3f}x "
          "(median of per-round ratios)")


if __name__ == "__main__":
    main()
