"""The ternary and peers suites' targets, checked on the records of one run.

Each target compares cells of the same run (a ratio of decode or prefill speeds, or one cell's
peak memory), so the verdict does not depend on how fast the machine happened to be that day.
`memwise bench --suite ternary` (or `peers`) prints them under its table and writes them into results.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from memwise.bench.cell import peak_bytes

Cell = tuple  # (model, engine, batch size) or (model, engine, batch size, dtype)


@dataclass(frozen=True)
class Target:
    what: str
    cells: tuple[Cell, ...]
    value: Callable[..., float]   # of the cells' records, in order
    unit: str                     # "x" for ratios, "MiB" for memory
    at_least: float | None = None
    at_most: float | None = None

    def goal(self) -> str:
        if self.at_least is not None:
            return f">= {self.at_least:g}{self.unit}"
        if self.at_most is not None and self.unit == "x":
            return f"<= {self.at_most:g}x"
        if self.at_most is not None:
            return f"<= {self.at_most * 2**20 / 1e9:g} GB ({self.at_most:,.0f} {self.unit})"
        return "-"


def _ratio(what: str, numerator: Cell, denominator: Cell, key: str = "decode_tok_s",
           at_least: float | None = None) -> Target:
    """A target on the ratio of one speed (key) between two cells of the run."""
    return Target(what, (numerator, denominator), lambda a, b: a[key] / b[key], "x", at_least=at_least)


TERNARY_TARGETS = (
    _ratio("decode, batch 1: mmfree-370m on memwise / gpt2-medium on transformers",
           ("mmfree-370m", "memwise", 1), ("gpt2-medium", "transformers", 1), at_least=10),
    _ratio("decode, batch 1: mmfree-2.7b on memwise / opt-2.7b on transformers",
           ("mmfree-2.7b", "memwise", 1), ("opt-2.7b", "transformers", 1), at_least=15),
    Target("peak resident set of the mmfree-2.7b cell (load and generate)",
           (("mmfree-2.7b", "memwise", 1),),
           lambda a: peak_bytes(a) / 2**20, "MiB", at_most=1.5e9 / 2**20),
    _ratio("prefill: mmfree-2.7b on memwise / opt-2.7b on transformers",
           ("mmfree-2.7b", "memwise", 1), ("opt-2.7b", "transformers", 1), "prefill_tok_s", at_least=1),
    _ratio("decode, batch 16 / batch 1: mmfree-370m on memwise",
           ("mmfree-370m", "memwise", 16), ("mmfree-370m", "memwise", 1), at_least=6),
    _ratio("decode, batch 16 / batch 1: mmfree-2.7b on memwise",
           ("mmfree-2.7b", "memwise", 16), ("mmfree-2.7b", "memwise", 1), at_least=6),
    _ratio("decode, batch 1: packed kernels / reference path (fake quantization), mmfree-370m",
           ("mmfree-370m", "memwise", 1), ("mmfree-370m", "memwise-reference", 1)),
)


def _peak_ratio(what: str, numerator: Cell, denominator: Cell, at_most: float) -> Target:
    return Target(what, (numerator, denominator), lambda a, b: peak_bytes(a) / peak_bytes(b), "x", at_most=at_most)


# memwise against llama.cpp on the same weights (bitnet) or the same bytes of ternary weights per token
# (a MatMul-free model against its Llama twin of the same matrix shapes, TQ2_0).
_PEER_PAIRS = (("mmfree-370m", "mmfree-370m-shapes", 2.0), ("mmfree-2.7b", "mmfree-2.7b-shapes", 2.0),
               ("bitnet-b1.58-large", "bitnet-b1.58-large", 1.5))
PEERS_TARGETS = (
    *(_ratio(f"decode: {ours} on memwise / {theirs} on llama.cpp (TQ2_0)", (ours, "memwise", 1),
             (theirs, "llama.cpp", 1, "tq2_0"), at_least=goal) for ours, theirs, goal in _PEER_PAIRS),
    *(_ratio(f"prefill: {ours} on memwise / {theirs} on llama.cpp (TQ2_0)", (ours, "memwise", 1),
             (theirs, "llama.cpp", 1, "tq2_0"), "prefill_tok_s", at_least=1.5) for ours, theirs, _ in _PEER_PAIRS),
    *(_peak_ratio(f"peak resident set: {ours} on memwise / {theirs} on llama.cpp (TQ2_0)", (ours, "memwise", 1),
                  (theirs, "llama.cpp", 1, "tq2_0"), at_most=1.05) for ours, theirs, _ in _PEER_PAIRS),
    # the same weights and C code without torch in the process (memwise.lite)
    *(_ratio(f"decode: {ours} on memwise-lite / {theirs} on llama.cpp (TQ2_0)", (ours, "memwise-lite", 1),
             (theirs, "llama.cpp", 1, "tq2_0"), at_least=goal) for ours, theirs, goal in _PEER_PAIRS),
    *(_ratio(f"prefill: {ours} on memwise-lite / {theirs} on llama.cpp (TQ2_0)", (ours, "memwise-lite", 1),
             (theirs, "llama.cpp", 1, "tq2_0"), "prefill_tok_s", at_least=1.5) for ours, theirs, _ in _PEER_PAIRS),
    *(_peak_ratio(f"peak resident set: {ours} on memwise-lite / {theirs} on llama.cpp (TQ2_0)",
                  (ours, "memwise-lite", 1), (theirs, "llama.cpp", 1, "tq2_0"), at_most=1.05)
      for ours, theirs, _ in _PEER_PAIRS),
    _ratio("decode: gpt2-medium float32, memwise / llama.cpp F32", ("gpt2-medium", "memwise", 1, "float32"),
           ("gpt2-medium", "llama.cpp", 1, "float32")),
    # issue 19: memwise's int8 / int4 against llama.cpp's Q8_0 / Q4_0 on the same model, >= 1.0x
    _ratio("decode: gpt2-medium, memwise int8 / llama.cpp Q8_0", ("gpt2-medium", "memwise", 1, "int8"),
           ("gpt2-medium", "llama.cpp", 1, "q8_0"), at_least=1.0),
    _ratio("decode: gpt2-medium, memwise int4 / llama.cpp Q4_0", ("gpt2-medium", "memwise", 1, "int4"),
           ("gpt2-medium", "llama.cpp", 1, "q4_0"), at_least=1.0),
    _ratio("decode: bitnet-b1.58-large, memwise / transformers (float32 Llama)",
           ("bitnet-b1.58-large", "memwise", 1, "float32"), ("bitnet-b1.58-large", "transformers", 1)),
)
LITE_TARGETS = tuple(t for t in PEERS_TARGETS if all(cell[0].startswith("mmfree-370m") for cell in t.cells))
SUITE_TARGETS = {"ternary": TERNARY_TARGETS, "peers": PEERS_TARGETS, "lite": LITE_TARGETS}


@dataclass(frozen=True)
class Verdict:
    target: Target
    value: float | None   # None: a cell is missing or did not run
    met: bool | None      # None: no value, or nothing to meet

    def measured(self) -> str:
        if self.value is None:
            return "not measured"
        if self.target.unit == "x":
            return f"{self.value:.2f}x" if self.target.at_most is not None else f"{self.value:.1f}x"
        return f"{self.value:,.0f} {self.target.unit}"

    def status(self) -> str:
        return {True: "met", False: "missed", None: "-"}[self.met]


def _find(records: list[dict[str, Any]], cell: Cell) -> dict[str, Any] | None:
    for record in records:
        # a quantized memwise cell is named by its scheme, as the suites list it
        key = (record.get("model"), record.get("engine"), record.get("batch_size"),
               record.get("quantize") or record.get("dtype"))
        if key[:len(cell)] == tuple(cell):
            return record if record.get("status") == "ok" else None
    return None


def for_suite(metadata: dict[str, Any]) -> tuple[Target, ...]:
    return SUITE_TARGETS.get(metadata.get("suite"), ())


def evaluate(records: list[dict[str, Any]], targets: tuple[Target, ...] = TERNARY_TARGETS) -> list[Verdict]:
    verdicts = []
    for target in targets:
        found = [_find(records, cell) for cell in target.cells]
        value = None
        if all(r is not None for r in found):
            try:
                value = float(target.value(*found))
            except (TypeError, KeyError, ZeroDivisionError):
                value = None   # a metric the cell did not produce
        met = None
        if value is not None and target.at_least is not None:
            met = value >= target.at_least
        elif value is not None and target.at_most is not None:
            met = value <= target.at_most
        verdicts.append(Verdict(target, value, met))
    return verdicts


def applies(metadata: dict[str, Any]) -> bool:
    return bool(for_suite(metadata))


def markdown(verdicts: list[Verdict]) -> str:
    lines = ["## Targets (cells of this run)", "", "| Target | Measured | Goal | |", "|---|---:|---:|---|"]
    lines += [f"| {v.target.what} | {v.measured()} | {v.target.goal()} | {v.status()} |" for v in verdicts]
    return "\n".join(lines) + "\n"


def text_lines(verdicts: list[Verdict]) -> list[str]:
    return ["Targets (cells of this run):"] + [
        f"  {v.status():>6}  {v.measured():>12}  (goal {v.target.goal()})  {v.target.what}" for v in verdicts]
