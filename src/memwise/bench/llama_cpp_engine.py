"""llama.cpp as a benchmark engine, through llama-cpp-python's low-level API (the optional extra `peers`).

The parent process writes the model's GGUF file first (gguf_export, cached; never timed), so a cell
only loads that file. A cell runs batch 1 (one sequence): llama_decode over the whole prompt, then one
llama_decode per new token, each followed by llama.cpp's own greedy sampler, EOS never checked, so
every run has exactly the requested tokens. Python only loops over these C calls. TTFT is the
prefill call plus the first token's sampling; llama.cpp's perf counters (llama_perf_context, reset
before each run) give its own prompt and per-token evaluation times, kept beside the timings as a
check that the measured decode is llama.cpp's evaluation and not Python's.

This module imports neither torch nor llama_cpp at import time: a llama.cpp cell holds what a
llama.cpp user's process holds.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from memwise.bench.sources import Source
from memwise.bench.timing import GenerationTiming

INSTALL_HINT = ("llama-cpp-python is not installed: pip install 'memwise[peers]' "
                "(it builds llama.cpp from source, about 10 minutes on 2 cores)")
SUPPORTED_TYPES = ("gpt2", "llama", "mistral", "phi")


def llama_cpp_missing() -> str | None:
    """None when llama_cpp imports, else the one-line reason with the install command."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):   # OSError: the package is there but its shared library is not
        return INSTALL_HINT
    return None


class LlamaCppEngine:
    name = "llama.cpp"
    uses_torch = False      # the cell leaves torch out of this process (see cell.py)

    def __init__(self) -> None:
        self.llama: Any = None
        self.model: Any = None
        self.context: Any = None
        self.sampler: Any = None
        self.path: Path | None = None
        self.threads = 1
        self.context_length = 512
        self.prompt_tokens = 128
        self.ggml_type = ""
        self.kv_cache_type = "f16"
        self.last_tokens: list[int] = []
        self._vocab = 0
        self._weights_bytes = 0
        self._decode_bytes = 0

    def can_run(self, source: Source, device: str) -> str | None:
        missing = llama_cpp_missing()
        if missing:
            return missing
        if device != "cpu":
            return "the llama.cpp engine runs llama-cpp-python's CPU build (--device cpu)"
        if source.model_type == "hgrn_bit":
            return ("llama.cpp has no hgrn_bit architecture; its same-work peer is the Llama model of the same "
                    "matrix shapes with ternary weights, e.g. preset:mmfree-2.7b-shapes at --dtype tq2_0")
        if source.model_type not in SUPPORTED_TYPES:
            return f"memwise's GGUF export does not write model_type {source.model_type!r} yet"
        return None

    def cell_reason(self, spec: Any) -> str | None:
        """Why a cell of this engine is skipped beyond the model: shapes and settings it does not run."""
        from memwise.bench.gguf_format import GGUF_TYPES

        if spec.batch_size != 1:
            return "the llama.cpp engine runs batch 1 only (one sequence per run)"
        if spec.dtype.lower() not in GGUF_TYPES:
            return f"dtype {spec.dtype} has no GGUF type here (one of: {', '.join(GGUF_TYPES)})"
        if (spec.repetition_penalty or 1.0) != 1.0 or spec.no_repeat_ngram_size:
            return "the llama.cpp engine runs plain greedy decoding (no repetition penalty or n-gram block)"
        return None

    def prepare(self, source: Source, spec: Any) -> str:
        """In the parent, before the cell: the cached GGUF file of the model at the cell's dtype."""
        from memwise.bench.gguf_export import export

        return str(export(source.source, spec.dtype))

    def configure(self, spec: Any) -> None:
        """What load needs from the cell beyond source and dtype: the prepared file, threads, lengths."""
        if not spec.engine_file:
            raise RuntimeError("no GGUF file was prepared for this cell (run it through memwise bench)")
        self.path = Path(spec.engine_file)
        self.threads = spec.threads or len(os.sched_getaffinity(0))
        longest = max([spec.prompt_tokens, *(len(p) for p in spec.prompts or [])])
        self.prompt_tokens = longest
        self.context_length = longest + max(spec.new_tokens, spec.max_length or 0) + 1

    def load(self, source: Source, dtype: str, device: str) -> None:
        import logging

        import llama_cpp

        from memwise.bench.gguf_format import gguf_type

        # llama-cpp-python prints every llama.cpp message by default; its debug ones (a line per graph
        # input at context creation) bury the load summary in the cell's log.
        logging.getLogger("llama-cpp-python").setLevel(logging.INFO)
        self.llama = llama_cpp
        llama_cpp.llama_backend_init()
        self.ggml_type = gguf_type(dtype)
        model_params = llama_cpp.llama_model_default_params()     # the file is mmapped, as llama.cpp does by default
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.context_length
        params.n_batch = params.n_ubatch = max(512, self.prompt_tokens)   # the prompt in one evaluation
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = False      # its timers are off by default; the record keeps them as a check
        if self.ggml_type == "F32":
            # float32 weights are compared with memwise's float32 cache; otherwise llama.cpp's default
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
            self.kv_cache_type = "f32"
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        if not self.context:
            raise RuntimeError(f"llama.cpp could not create a context of {self.context_length} tokens")
        self.sampler = llama_cpp.llama_sampler_init_greedy()
        self._vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model)))
        self._weights_bytes = int(llama_cpp.llama_model_size(self.model))
        self._decode_bytes = self._weights_bytes - self._table_bytes()

    def _table_bytes(self) -> int:
        """Bytes of tables read one row per token (token embedding unless it is also the output, positions)."""
        from gguf import GGUFReader

        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(self.path)).tensors}
        tables = tensors.get("position_embd.weight", 0)
        if "output.weight" in tensors:
            tables += tensors.get("token_embd.weight", 0)
        return tables

    def _decode(self, tokens: Any, count: int) -> None:
        batch = self.llama.llama_batch_get_one(tokens, count)
        code = self.llama.llama_decode(self.context, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def generate(self, input_ids: Any, options: Any) -> Any:
        llama = self.llama
        ids = [int(t) for t in (input_ids.tolist()[0] if hasattr(input_ids, "tolist") else input_ids[0])]
        new_tokens = int(options.max_new_tokens)
        llama.llama_memory_clear(llama.llama_get_memory(self.context), True)
        llama.llama_sampler_reset(self.sampler)
        llama.llama_perf_context_reset(self.context)
        prompt = (llama.llama_token * len(ids))(*ids)
        step = (llama.llama_token * 1)()
        generated = []
        start = time.perf_counter()
        self._decode(prompt, len(ids))
        token = llama.llama_sampler_sample(self.sampler, self.context, -1)
        first = time.perf_counter()
        generated.append(token)
        for _ in range(new_tokens - 1):
            step[0] = token
            self._decode(step, 1)
            token = llama.llama_sampler_sample(self.sampler, self.context, -1)
            generated.append(token)
        end = time.perf_counter()
        perf = llama.llama_perf_context(self.context)
        self.last_tokens = generated
        counters = {"t_p_eval_ms": perf.t_p_eval_ms, "t_eval_ms": perf.t_eval_ms, "n_p_eval": perf.n_p_eval,
                    "n_eval": perf.n_eval}
        return GenerationTiming(first - start, end - start, len(generated), counters)

    def weights_bytes(self) -> int:
        return self._weights_bytes

    def decode_bytes_per_token(self) -> int:
        return self._decode_bytes

    def vocab_size(self) -> int:
        return self._vocab

    def describe(self) -> dict[str, Any]:
        """Fields for the cell's record: what exactly ran."""
        from importlib.metadata import version

        return {"weights_format": f"GGUF {self.ggml_type}", "threads": self.threads,
                "engine_details": {"gguf_file": str(self.path), "gguf_type": self.ggml_type,
                                   "kv_cache_type": self.kv_cache_type, "context_length": self.context_length,
                                   "llama_cpp_python": version("llama-cpp-python"), "batch": "1 only",
                                   "decoding": "greedy (llama_sampler_init_greedy), EOS ignored"}}
