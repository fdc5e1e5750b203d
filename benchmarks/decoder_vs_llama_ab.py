"""Decode ms per token of a quantized decoder preset in memwise (fused step on and off) and in
llama.cpp (the GGUF file memwise writes for its bench, Q4_0 for int4 and Q8_0 for int8), in one
process, in alternating rounds, so that the drift of a shared machine hits all three alike:

    PYTHONPATH=src python benchmarks/decoder_vs_llama_ab.py gpt2-medium --quantize int4 --rounds 5 --steps 32 [--threads 2]

Each round, per engine: a fresh 128-token prompt evaluation (not timed), then `steps` single-token
decode steps timed together (memwise: embedding, layers, final norm, lm_head and the argmax; llama.cpp:
llama_decode and its greedy sampler). Prints per-engine medians and the medians of the per-round
ratios. The two runtimes' worker threads share the process: each engine's threads may still spin a
little after its round while the next engine starts.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import memwise

DTYPES = {"int4": "q4_0", "int8": "q8_0"}


def memwise_round(model, fused: bool, prompt: torch.Tensor, steps: int) -> float:
    os.environ["MEMWISE_FUSED_STEP"] = "1" if fused else "0"
    cache = model.new_cache(1, prompt.shape[1] + steps + 1)
    with torch.inference_mode():
        token = model(prompt, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / steps * 1e3


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API, as memwise's bench engine drives it."""

    def __init__(self, path: str, threads: int, context: int):
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = context, 512, 512
        params.n_threads = params.n_threads_batch = threads
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        self.sampler = llama_cpp.llama_sampler_init_greedy()

    def _decode(self, tokens, count: int) -> None:
        if self.lib.llama_decode(self.context, self.lib.llama_batch_get_one(tokens, count)) != 0:
            raise RuntimeError("llama_decode failed")

    def round(self, prompt: list[int], steps: int) -> float:
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.context), True)
        self._decode((lib.llama_token * len(prompt))(*prompt), len(prompt))
        token = lib.llama_sampler_sample(self.sampler, self.context, -1)
        one = (lib.llama_token * 1)()
        start = time.perf_counter()
        for _ in range(steps):
            one[0] = token
            self._decode(one, 1)
            token = lib.llama_sampler_sample(self.sampler, self.context, -1)
        return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--quantize", default="int4", choices=tuple(DTYPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="threads of both engines (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from memwise.bench.gguf_export import export

    source = f"preset:{args.preset}"
    model = memwise.load(source, quantize=args.quantize).module
    llama = LlamaCpp(str(export(source, DTYPES[args.quantize])), torch.get_num_threads(), args.prompt + args.steps + 8)
    prompt = torch.randint(0, model.spec.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"memwise unfused": [], "memwise fused": [], "llama.cpp": []}
    for _ in range(args.rounds):
        times["memwise unfused"].append(memwise_round(model, False, prompt, args.steps))
        times["llama.cpp"].append(llama.round(prompt[0].tolist(), args.steps))
        times["memwise fused"].append(memwise_round(model, True, prompt, args.steps))
    if not model._fused_decoder:
        raise SystemExit(f"{args.preset} with {args.quantize} has no fused step")
    print(f"{args.preset} memwise {args.quantize} vs llama.cpp {DTYPES[args.quantize]}, {torch.get_num_threads()} threads, "
          f"prompt {args.prompt}, {args.steps} steps x {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        print(f"  {name:16s} median {statistics.median(values):7.2f} ms/token  rounds {[round(v, 2) for v in values]}")
    for name in ("memwise unfused", "memwise fused"):
        ratio = statistics.median(lc / mw for lc, mw in zip(times["llama.cpp"], times[name]))
        print(f"  {name} speed / llama.cpp speed: {ratio:.2f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
