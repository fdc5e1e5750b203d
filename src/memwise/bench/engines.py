"""Engines: the programs a cell measures, each behind the same small interface.

An engine says whether it can run a source at all (can_run, answered in the parent before any process
is started), loads it, generates a fixed number of tokens with EOS ignored while reporting when the
first token appeared, and says how many bytes it holds for weights. Adding llama.cpp or vLLM means
adding one class and one line in ENGINES (llama.cpp's is in llama_cpp_engine.py, memwise-lite's in
lite_engine.py). Optional methods,
looked up with getattr: cell_reason(spec) skips a cell for its shape or settings, prepare(source,
spec) runs in the parent before the cell (untimed; returns a file for the cell), configure(spec)
gives the cell's spec to the engine before load, describe() adds fields to the record, and
uses_torch = False keeps torch out of the cell's process.

Time to first token: memwise streams tokens, so TTFT is the time until its stream yields the first
step. transformers hands every step to a streamer right after choosing the token (the prompt goes
first, then one call per step), so TTFT is the time of its second call. Both mark the same moment:
the prompt has been processed and the first new token exists on the host, within the one timed
generation whose end gives e2e. No second run is needed to split prefill from decode.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Protocol

from memwise.bench.lite_engine import LiteEngine
from memwise.bench.llama_cpp_engine import LlamaCppEngine
from memwise.bench.sources import Source
from memwise.bench.timing import GenerationTiming

if TYPE_CHECKING:   # torch stays out of processes that only run llama.cpp
    from memwise.generate import GenerationOptions

HGRN_BIT_REASON = "transformers cannot run hgrn_bit without its GPU-only package (mmfreelm + triton)"


class Engine(Protocol):
    name: str

    def can_run(self, source: Source, device: str) -> str | None:
        """None if this engine can run the source, else the one-line reason it cannot."""

    def load(self, source: Source, dtype: str, device: str) -> None: ...

    def generate(self, input_ids: Any, options: GenerationOptions) -> GenerationTiming:
        """Generate options.max_new_tokens tokens per sequence after input_ids [B, T], timed. The bench
        asks for greedy decoding with EOS ignored (min_new_tokens = max_new_tokens), so that every run
        has the requested length."""

    def weights_bytes(self) -> int: ...

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads (embedding tables contribute one row, unless tied)."""

    def vocab_size(self) -> int: ...


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class _LoadedEngine:
    """The state both engines keep: the loaded model and the device it runs on."""

    def __init__(self) -> None:
        self.model: Any = None
        self.device = "cpu"


class MemwiseEngine(_LoadedEngine):
    name = "memwise"

    def can_run(self, source: Source, device: str) -> str | None:
        from memwise.models import FAMILY_MODULES

        if source.model_type not in FAMILY_MODULES:
            return f"memwise does not support model_type {source.model_type!r}"
        return None

    def load(self, source: Source, dtype: str, device: str, quantize: str | None = None,
             kv_cache: str | None = None, **offload: Any) -> None:
        import memwise

        self.device = device
        self.model = memwise.load(source.source, dtype=dtype, device=device, quantize=quantize, kv_cache=kv_cache,
                                  **offload)

    def generate(self, input_ids: Any, options: GenerationOptions) -> GenerationTiming:
        _sync(self.device)
        start = time.perf_counter()
        first = None
        steps = 0
        for _ in self.model.stream(input_ids, **dataclasses.asdict(options)):
            if first is None:
                _sync(self.device)
                first = time.perf_counter()
            steps += 1
        _sync(self.device)
        end = time.perf_counter()
        return GenerationTiming((first or end) - start, end - start, steps)

    def weights_bytes(self) -> int:
        return int(self.model.weights_bytes())

    def decode_bytes_per_token(self) -> int:
        return self.model.decode_bytes_per_token()

    def vocab_size(self) -> int:
        return int(self.model.spec.vocab_size)


class MemwiseReferenceEngine(MemwiseEngine):
    """memwise with MatMul-free models on the plain PyTorch path (ternary weights unpacked and
    multiplied in floating point on every call): what fake quantization costs next to the kernels."""

    name = "memwise-reference"

    def can_run(self, source: Source, device: str) -> str | None:
        if source.model_type != "hgrn_bit":
            return "only MatMul-free (hgrn_bit) models have a reference ternary path"
        return None

    def load(self, source: Source, dtype: str, device: str) -> None:
        super().load(source, dtype, device)
        self.model.module.backend = "reference"


def transformers_config(config: dict[str, Any]) -> Any:
    """transformers' config object of a config.json dict (the fields that name the class or code left out)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    return AutoConfig.for_model(config["model_type"], **fields)


class _StepClock:
    """A transformers streamer that only notes when each step's tokens arrive (the first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersEngine(_LoadedEngine):
    name = "transformers"

    def can_run(self, source: Source, device: str) -> str | None:
        model_type = source.model_type
        if model_type == "hgrn_bit":
            return HGRN_BIT_REASON
        try:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        except ImportError:
            return "transformers is not installed (pip install 'memwise[bench]')"
        if model_type not in CONFIG_MAPPING:
            return f"transformers has no architecture for model_type {model_type!r}"
        return None

    def load(self, source: Source, dtype: str, device: str) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        from memwise.dtypes import parse_dtype

        transformers.logging.set_verbosity_error()
        torch_dtype = parse_dtype(dtype)
        self.device = device
        if source.kind == "preset":
            assert source.config is not None
            config = transformers_config(source.config)
            torch.manual_seed(0)  # random weights, but the same ones every time
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.source, dtype=torch_dtype)
        self.model = model.to(device).eval()

    def generate(self, input_ids: Any, options: GenerationOptions) -> GenerationTiming:
        import torch

        clock = _StepClock()
        config = self.model.config
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids)
        _sync(self.device)
        start = time.perf_counter()
        # Every setting from the options, so that a checkpoint's generation_config.json cannot give
        # transformers other settings than memwise gets (a penalty of 1.0 and size 0 add no processor).
        output = self.model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=options.max_new_tokens,
                                     min_new_tokens=options.min_new_tokens, do_sample=options.do_sample,
                                     repetition_penalty=options.repetition_penalty,
                                     no_repeat_ngram_size=options.no_repeat_ngram_size, pad_token_id=pad,
                                     streamer=clock)
        _sync(self.device)
        end = time.perf_counter()
        produced = output.shape[1] - input_ids.shape[1]
        first = clock.times[1] if len(clock.times) > 1 else end
        return GenerationTiming(first - start, end - start, int(produced))

    def weights_bytes(self) -> int:
        # parameters() yields a tied embedding once, so this is what the process holds
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def decode_bytes_per_token(self) -> int:
        tables = [self.model.get_input_embeddings().weight]
        output = self.model.get_output_embeddings()
        if output is not None and output.weight is tables[0]:
            tables = []     # tied: the lm_head reads the whole table every step
        for name, module in self.model.named_modules():
            # learned position tables (gpt2 wpe, opt embed_positions): one row per step
            if name.endswith(("wpe", "embed_positions")) and hasattr(module, "weight"):
                tables.append(module.weight)
        return self.weights_bytes() - sum(t.numel() * t.element_size() for t in tables)

    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])


ENGINES: dict[str, type] = {"memwise": MemwiseEngine, "memwise-reference": MemwiseReferenceEngine,
                            "memwise-lite": LiteEngine, "transformers": TransformersEngine, "llama.cpp": LlamaCppEngine}


def engine_named(name: str) -> Engine:
    return ENGINES[name]()
