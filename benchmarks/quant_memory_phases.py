"""Where the resident memory of a quantized load + generate goes, phase by phase, in one fresh process.

    PYTHONPATH=src python benchmarks/quant_memory_phases.py --model preset:opt-2.7b --quantize int4 \
        --prompt 128 --new 128

Prints the resident set after `import torch` and `import memwise`, the load's high-water mark (VmHWM)
and the resident set once it is done, which weight was being made when a sampling thread (every 5 ms)
saw the load's highest resident set, and the generation's high-water mark beside the model's weights
and cache bytes. A memwise bench cell measures the same two peaks (bench/cell.py); this script says
what they are made of. Synthetic (preset) weights: each weight's name is known as it is generated.
"""
from __future__ import annotations

import argparse
import threading
import time

MiB = 2**20


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    """The highest VmRSS seen, and the label that was current then."""

    def __init__(self):
        super().__init__(daemon=True)
        self.label, self.peak, self.peak_label, self.running = "start", 0.0, "start", True

    def run(self) -> None:
        while self.running:
            rss = status_mib("VmRSS")
            if rss > self.peak:
                self.peak, self.peak_label = rss, self.label
            time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:opt-2.7b")
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--kv-cache", default=None)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()

    start = status_mib("VmRSS")
    import torch
    after_torch = status_mib("VmRSS")
    import memwise
    from memwise.bench.memory import reset_peak_rss
    from memwise.models.decoder import build
    after_import = status_mib("VmRSS")
    print(f"resident: start {start:.0f} MiB, after import torch {after_torch:.0f}, after import memwise {after_import:.0f}")

    sampler = Sampler()
    sampler.start()
    generate_tensors = build.synthetic_tensors

    def labelled(spec, seed=0):
        for name, tensor in generate_tensors(spec, seed):
            sampler.label = name
            yield name, tensor
        sampler.label = "after the last weight"
    build.synthetic_tensors = labelled
    reset_peak_rss()
    model = memwise.load(args.model, quantize=args.quantize, kv_cache=args.kv_cache)
    sampler.label = "loaded"
    load_peak, after_load = status_mib("VmHWM"), status_mib("VmRSS")
    weights = model.weights_bytes() / MiB
    print(f"load: peak {load_peak:.0f} MiB, resident after {after_load:.0f} (peak - after: {load_peak - after_load:.0f}); "
          f"weights {weights:.1f} MiB; resident after - import - weights: {after_load - after_import - weights:.0f}")
    print(f"load: highest sampled resident set {sampler.peak:.0f} MiB while making {sampler.peak_label!r}")

    reset_peak_rss()
    sampler.peak, sampler.label = 0.0, "generate"
    ids = torch.randint(0, model.spec.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=args.new, ignore_eos=True)
    cache = model.module.cache_bytes(1, args.prompt + args.new) / MiB
    generate_peak = status_mib("VmHWM")
    print(f"generate: peak {generate_peak:.0f} MiB; KV cache {cache:.1f} MiB; peak - after load - cache: "
          f"{generate_peak - after_load - cache:.0f} (activations, logits, workspace)")
    print(f"peak of load + generate: {max(load_peak, generate_peak):.0f} MiB = "
          f"{max(load_peak, generate_peak) * MiB / 1e9:.3f} GB")
    sampler.running = False


if __name__ == "__main__":
    main()
