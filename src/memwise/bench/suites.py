"""Which cells a bench run measures: the default suite, the seed suite, and the two sweeps.

A Matrix is the cross product models x engines x dtypes x batch sizes x prompt lengths x new tokens.
Suites only choose its defaults; every flag the user gives overrides the suite's choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_ENGINES = ("memwise", "transformers")

# The 370M class of the public MatMul-free comparison; the main job of `memwise bench`.
DEFAULT_MODELS = ("mmfree-370m", "gpt2-medium", "opt-350m")

SIZE_CLASSES = {
    "370M": ("gpt2-medium", "opt-350m", "mmfree-370m"),
    "1.3B": ("gpt2-xl", "phi-1_5", "mmfree-1.3b"),
    "2.7B": ("opt-2.7b", "mmfree-2.7b"),
}

# What the public comparison published: seconds per answer and peak MB, on a T4 GPU, with all
# models resident at once, one generation per prompt without warm-up, and EOS free to stop early.
PUBLISHED_LABEL = "T4 GPU, public comparison"
PUBLISHED = {
    "gpt2-medium": {"seconds_per_answer": 3.0, "peak_mb": 2810},
    "opt-350m": {"seconds_per_answer": 2.3, "peak_mb": 2815},
    "mmfree-370m": {"seconds_per_answer": 16.0, "peak_mb": 2900},
    "gpt2-xl": {"seconds_per_answer": 5.3, "peak_mb": 12435},
    "phi-1_5": {"seconds_per_answer": 2.9, "peak_mb": 12033},
    "mmfree-1.3b": {"seconds_per_answer": 37.0, "peak_mb": 5470},
    "opt-2.7b": {"seconds_per_answer": 6.0, "peak_mb": 5200},
    "mmfree-2.7b": {"seconds_per_answer": 55.6, "peak_mb": 5501},
}

# The comparison's first prompt, and others of the same kind: short open questions.
SEED_PROMPTS = (
    "What are the benefits of renewable energy?",
    "How does regular exercise improve mental health?",
    "Why is biodiversity important for ecosystems?",
    "What are the main causes of air pollution in cities?",
)
SEED_MAX_LENGTH = 128
SEED_REPETITION_PENALTY = 1.1
SEED_NO_REPEAT_NGRAM_SIZE = 2

# Sweeps: every length fits gpt2's 1024 learned positions with the new tokens added.
CONTEXT_SWEEP = (128, 256, 512, 896)
BATCH_SWEEP = (1, 2, 4, 8)
SWEEP_NEW_TOKENS = 64


# The ternary-kernel targets, side by side in one run: MatMul-free models on the packed kernels (and
# the 370M one on the reference path) against transformers on the conventional model of their class,
# and each MatMul-free model at batch 16 for the batch-16 / batch-1 throughput ratio.
TERNARY_CELLS = (
    ("mmfree-370m", "memwise", 1), ("mmfree-370m", "memwise", 16), ("mmfree-370m", "memwise-reference", 1),
    ("gpt2-medium", "transformers", 1),
    ("mmfree-2.7b", "memwise", 1), ("mmfree-2.7b", "memwise", 16), ("opt-2.7b", "transformers", 1),
)


# memwise against llama.cpp on the same work, batch 1 (llama.cpp cells run one sequence): each
# MatMul-free model on memwise's packed kernels against its shape twin on llama.cpp (a Llama model whose
# every matrix has the HGRN-Bit matrix's shape, ternary weights in TQ2_0: the same bytes per token), and
# gpt2-medium on both engines at float32, memwise's int8 / int4 weights against llama.cpp's Q8_0 / Q4_0.
# The ternary models (MatMul-free and BitNet) also run on memwise-lite, the same C code without torch in the process.
# (model, engine, batch, dtype); a memwise cell's dtype slot may name a weight scheme (float32 activations).
PEERS_CELLS = (
    ("mmfree-370m", "memwise", 1, "float32"), ("mmfree-370m", "memwise-lite", 1, "float32"),
    ("preset:mmfree-370m-shapes", "llama.cpp", 1, "tq2_0"),
    ("mmfree-2.7b", "memwise", 1, "float32"), ("mmfree-2.7b", "memwise-lite", 1, "float32"),
    ("preset:mmfree-2.7b-shapes", "llama.cpp", 1, "tq2_0"),
    ("gpt2-medium", "memwise", 1, "float32"), ("gpt2-medium", "llama.cpp", 1, "float32"),
    ("gpt2-medium", "memwise", 1, "int8"), ("gpt2-medium", "llama.cpp", 1, "q8_0"),
    ("gpt2-medium", "memwise", 1, "int4"), ("gpt2-medium", "llama.cpp", 1, "q4_0"),
    # BitNet b1.58 of 1bitLLM's shape (llama.cpp's "bitnet" graph), the same ternary codes on both engines;
    # transformers runs its config as a float32 Llama (what AutoModelForCausalLM gives without remote code).
    ("bitnet-b1.58-large", "memwise", 1, "float32"), ("bitnet-b1.58-large", "memwise-lite", 1, "float32"),
    ("bitnet-b1.58-large", "llama.cpp", 1, "tq2_0"),
    ("bitnet-b1.58-large", "transformers", 1, "float32"),
)


@dataclass
class Matrix:
    models: list[str]
    engines: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINES))
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    prompt_tokens: list[int] = field(default_factory=lambda: [128])
    new_tokens: list[int] = field(default_factory=lambda: [128])
    runs: int = 3
    warmup: int = 1
    suite: str = "default"
    sweep: str | None = None
    # The seed suite's real prompts and generation settings (None elsewhere).
    prompts: list[str] | None = None
    max_length: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    # (model, engine, batch) triples run instead of the cross product (the ternary suite), or
    # (model, engine, batch, dtype) where each cell has its own dtype (the peers suite).
    explicit: list[tuple[Any, ...]] | None = None

    def cells(self) -> list[tuple[str, str, str, int, int, int]]:
        """(model, engine, dtype, batch, prompt, new) in run order: a model's cells together."""
        if self.explicit:
            return [(m, e, d, b, p, n) for m, e, b, *own in self.explicit for d in (own or self.dtypes)
                    for p in self.prompt_tokens for n in self.new_tokens]
        if self.prompts:   # prompt lengths and new tokens come from the prompts and max_length
            return [(m, e, d, b, 0, 0) for m in self.models for e in self.engines for d in self.dtypes
                    for b in self.batch_sizes]
        return [(m, e, d, b, p, n) for m in self.models for e in self.engines for d in self.dtypes
                for b in self.batch_sizes for p in self.prompt_tokens for n in self.new_tokens]


def default_suite() -> Matrix:
    return Matrix(models=list(DEFAULT_MODELS))


def seed_suite() -> Matrix:
    models = [m for size in SIZE_CLASSES.values() for m in size]
    return Matrix(models=models, suite="seed", prompts=list(SEED_PROMPTS), max_length=SEED_MAX_LENGTH,
                  repetition_penalty=SEED_REPETITION_PENALTY, no_repeat_ngram_size=SEED_NO_REPEAT_NGRAM_SIZE,
                  runs=len(SEED_PROMPTS))


def context_sweep() -> Matrix:
    return Matrix(models=list(DEFAULT_MODELS), prompt_tokens=list(CONTEXT_SWEEP), new_tokens=[SWEEP_NEW_TOKENS],
                  suite="sweep", sweep="context")


def batch_sweep() -> Matrix:
    return Matrix(models=list(DEFAULT_MODELS), batch_sizes=list(BATCH_SWEEP), new_tokens=[SWEEP_NEW_TOKENS],
                  suite="sweep", sweep="batch")


def ternary_suite() -> Matrix:
    return Matrix(models=sorted({m for m, _, _ in TERNARY_CELLS}), suite="ternary", explicit=list(TERNARY_CELLS))


def peers_suite() -> Matrix:
    return Matrix(models=list(dict.fromkeys(m for m, *_ in PEERS_CELLS)), suite="peers", explicit=list(PEERS_CELLS))


# The peers suite's mmfree-370m cells alone: memwise with and without torch in the process
# (memwise-lite) against the TQ2_0 shape twin on llama.cpp, where importing torch is a third of the
# resident set.
LITE_CELLS = tuple(cell for cell in PEERS_CELLS if cell[0] in ("mmfree-370m", "preset:mmfree-370m-shapes"))


def lite_suite() -> Matrix:
    return Matrix(models=list(dict.fromkeys(m for m, *_ in LITE_CELLS)), suite="lite", explicit=list(LITE_CELLS))


SUITES = {"default": default_suite, "seed": seed_suite, "ternary": ternary_suite, "peers": peers_suite,
          "lite": lite_suite}
SWEEPS = {"context": context_sweep, "batch": batch_sweep}


def build_matrix(suite: str = "default", sweep: str | None = None, **overrides: object) -> Matrix:
    """The suite's (or sweep's) matrix with the user's flags applied; None overrides are ignored."""
    matrix = SWEEPS[sweep]() if sweep else SUITES[suite]()
    given = {k: v for k, v in overrides.items() if v is not None and v != []}
    if given.keys() & {"models", "engines", "batch_sizes"}:
        given["explicit"] = None    # the user chose the cells: back to the cross product
    return replace(matrix, **given)
