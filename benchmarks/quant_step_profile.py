"""Where a batch-1 decode step of a quantized decoder (gpt2-medium by default, synthetic weights)
spends its time: the whole step, each kind of linear called alone in layer order (so that its weights
come from memory as in a step) with the weight bytes it reads per second, the lm_head, and what is
left (attention, norms, GELU, residuals, embedding, Python and torch dispatch).

    PYTHONPATH=src python benchmarks/quant_step_profile.py --quantize int8 --threads 1 --steps 30

Medians of --steps repetitions; timings on a shared machine move with its load: compare within a run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import memwise
from memwise.kernels.bandwidth import read_bandwidth_bytes_per_s

KINDS = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def median_ms(run, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:gpt2-medium")
    parser.add_argument("--quantize", default="int8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompt", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = memwise.load(args.model, quantize=None if args.quantize == "float32" else args.quantize)
    decoder = model.module
    cache = decoder.new_cache(1, args.prompt + 4 * args.steps + 8)
    ids = torch.randint(3, 50000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    ones = torch.ones((1, 1), dtype=torch.bool)
    with torch.inference_mode():
        decoder(ids, cache, torch.ones_like(ids, dtype=torch.bool), last_only=True)
        token = torch.tensor([[17]])
        step_ms = median_ms(lambda: decoder(token, cache, ones, last_only=True), args.steps)
        hidden = decoder.spec.hidden_size
        total_linear, report = 0.0, []
        for kind in KINDS:
            owner, attr = kind.split(".")
            linears = [getattr(getattr(block, owner), attr) for block in decoder.layers]
            x = torch.randn(1, 1, linears[0].in_features)
            ms = median_ms(lambda: [linear(x) for linear in linears], args.steps)
            nbytes = sum(module_bytes(linear) for linear in linears)
            total_linear += ms
            report.append((f"{kind} x{len(linears)}", ms, nbytes))
        head_x = torch.randn(1, 1, decoder.lm_head.in_features)
        head_ms = median_ms(lambda: decoder.lm_head(head_x), args.steps)
        report.append(("lm_head", head_ms, module_bytes(decoder.lm_head)))
        norm_x = torch.randn(1, 1, hidden)
        norms = [m for block in decoder.layers for m in (block.attn_norm, block.mlp_norm) if m is not None]
        norm_ms = median_ms(lambda: [n(norm_x) for n in norms], args.steps)
        spec, length = decoder.spec, cache.length
        q = torch.randn(1, spec.num_heads, 1, spec.head_dim)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        attention_ms = median_ms(lambda: [sdpa(q, cache.keys[i][:, :, :length], cache.values[i][:, :, :length])
                                          for i in range(spec.num_layers)], args.steps)
        inner = torch.randn(1, 1, spec.intermediate_size)
        gelu_ms = median_ms(lambda: [torch.nn.functional.gelu(inner, approximate="tanh")
                                     for _ in range(spec.num_layers)], args.steps)
    bandwidth = read_bandwidth_bytes_per_s()
    print(f"{args.model} {args.quantize}, {args.threads} thread(s); read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"decode step: {step_ms:.2f} ms ({1e3 / step_ms:.1f} tok/s)")
    for name, ms, nbytes in report:
        floor = 1e3 * nbytes / bandwidth
        print(f"  {name:14s} {ms:7.2f} ms  {nbytes / 2**20:7.1f} MiB  {nbytes / ms / 1e6:6.1f} GB/s  "
              f"(at bandwidth {floor:.2f} ms)")
    products = total_linear + head_ms
    print(f"  norms x{len(norms):<10d} {norm_ms:7.2f} ms")
    kv_bytes = 2 * decoder.spec.num_layers * length * decoder.spec.num_kv_heads * decoder.spec.head_dim * 4
    print(f"  attention x{decoder.spec.num_layers:<6d} {attention_ms:7.2f} ms  {kv_bytes / 2**20:7.1f} MiB of keys and "
          f"values at {length} slots (scaled_dot_product_attention alone)")
    print(f"  gelu x{decoder.spec.num_layers:<11d} {gelu_ms:7.2f} ms")
    print(f"  products total {products:7.2f} ms; rest of the step (attention, norms, activation, "
          f"residuals, embedding, dispatch) {step_ms - products:.2f} ms")


if __name__ == "__main__":
    main()
