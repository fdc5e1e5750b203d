"""Decode speed of gpt2-medium int4 (synthetic weights) with float16 group constants (this tree) against
the same model run by an older build of the _fourbit extension that reads float32 constants, in
alternating rounds in one process (other processes' load falls on both alike). Both compute with the
same constant values (the float16 ones widened), so their logits are equal and only the bytes read
per step differ; the script checks that before timing. On a shared machine the medians swing with
the neighbours' load; the best round of each (the least disturbed) is printed beside them, and
--kernel-repeats N times each of the model's int4 matrices alone (a product at M = 1), alternating
old and new N times, and compares the sums of their fastest runs.

--old-extension: a build of memwise/kernels/_fourbit from before float16 constants (a checkout of
the commit before them, `python setup.py build_ext --inplace`).

    OMP_WAIT_POLICY=passive PYTHONPATH=src python benchmarks/int4_constants_ab.py \
        --old-extension OLD/src/memwise/kernels/_fourbit.cpython-311-x86_64-linux-gnu.so --threads 2
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

import memwise
from memwise.kernels import int4, isa_id, isa_paths, num_threads
from memwise.models.decoder.quantized import Int4Linear

sys.path.insert(0, str(Path(__file__).parent))
from int8_decode_ab import memwise_decode  # noqa: E402


def load_extension(path: str):
    """The old build under another package name (its init function is named after the last part)."""
    spec = importlib.util.spec_from_file_location("old_build._fourbit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_kernel(ext, linear: Int4Linear, params32: torch.Tensor):
    """int4_linear through the old extension with float32 constants (its signature is unchanged)."""
    isa, kp = isa_id(isa_paths()[0]), int4.padded_cols(linear.in_features)
    bias = 0 if linear.bias is None else linear.bias.data_ptr()

    def run(x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        rows = x.reshape(-1, linear.in_features).float().contiguous()
        out = torch.empty((rows.shape[0], linear.out_features), dtype=torch.float32)
        ext.int4_linear(isa, linear.codes.data_ptr(), params32.data_ptr(), bias, linear.out_features, kp,
                        rows.data_ptr(), rows.shape[0], linear.in_features, out.data_ptr(), threads or num_threads())
        return out.reshape(*x.shape[:-1], linear.out_features)
    return run


def use(model, kernels: dict | None) -> None:
    """Old kernels in place of each Int4Linear's cached one (None: drop them, the new ones are made)."""
    for module in model.module.modules():
        if isinstance(module, Int4Linear):
            module.__dict__.pop("_kernel", None)
            if kernels is not None:
                tensors = (module.codes, module.params, module._parameters.get("bias"))
                module.__dict__["_kernel"] = (tensors, kernels[id(module)])


def kernel_ab(model, old: dict, repeats: int) -> None:
    """Fastest of `repeats` alternating runs of each distinct int4 matrix shape, old against new."""
    seen, best = set(), {"old": 0.0, "new": 0.0}
    for module in model.module.modules():
        shape = (module.out_features, module.in_features) if isinstance(module, Int4Linear) else None
        if shape is None or shape in seen:
            continue
        seen.add(shape)
        x = torch.randn(1, module.in_features)
        runs = {"old": old[id(module)], "new": int4.linear_kernel(module.matrix(), module.bias)}
        times = {"old": [], "new": []}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
        for name in best:
            best[name] += min(times[name])
        print(f"{shape[0]}x{shape[1]}: fastest old {min(times['old']) * 1e6:.0f} us, new {min(times['new']) * 1e6:.0f} us")
    print(f"kernels, sum of fastest runs: new/old time {best['new'] / best['old']:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-extension", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--kernel-repeats", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ext = load_extension(args.old_extension)
    model = memwise.load("preset:gpt2-medium", quantize="int4")
    keep = {id(m): m.params.float().contiguous() for m in model.module.modules() if isinstance(m, Int4Linear)}
    old = {id(m): old_kernel(ext, m, keep[id(m)]) for m in model.module.modules() if isinstance(m, Int4Linear)}
    ids = torch.randint(3, 50000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    use(model, old)
    before = model.logits(ids[:, :16])
    use(model, None)
    assert torch.equal(before, model.logits(ids[:, :16])), "old and new kernels disagree"
    if args.kernel_repeats:
        kernel_ab(model, old, args.kernel_repeats)
    runs = {"float32 constants (old)": old, "float16 constants (new)": None}
    for kernels in runs.values():
        use(model, kernels)
        memwise_decode(model, ids, args.new)     # warm-up
    ratios, rounds = [], []
    for r in range(args.rounds):
        speeds = {}
        for name, kernels in runs.items():
            use(model, kernels)
            speeds[name] = memwise_decode(model, ids, args.new)
        ratios.append(speeds["float16 constants (new)"] / speeds["float32 constants (old)"])
        rounds.append(speeds)
        print(f"round {r}: " + ", ".join(f"{n} {v:.2f} tok/s" for n, v in speeds.items()) + f" | new/old {ratios[-1]:.3f}x",
              flush=True)
    if not rounds:
        return
    best = {name: max(r[name] for r in rounds) for name in runs}
    print(f"median new/old {sorted(ratios)[len(ratios) // 2]:.3f}x over {args.rounds} rounds; best rounds: "
          + ", ".join(f"{n} {v:.2f} tok/s" for n, v in best.items())
          + f", new/old {best['float16 constants (new)'] / best['float32 constants (old)']:.3f}x")


if __name__ == "__main__":
    main()
