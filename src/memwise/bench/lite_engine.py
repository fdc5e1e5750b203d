"""The `memwise-lite` engine: memwise's ternary models (HGRN-Bit, BitNet) on the torch-free runtime (memwise.lite).

It runs the same weights as the `memwise` engine, with the same C code (the fused decode step; the
kernel library's multi-row BitLinear for prefill), in a process that never imports torch: what a user
who installs memwise to run ternary models on a CPU pays in memory. The record's engine says which
runtime ran, and its weights_format names the file.

Like the llama.cpp cells, the cell reads a file that the parent wrote before it (untimed, cached
under $XDG_CACHE_HOME/memwise/packed): `memwise convert`'s packed checkpoint of the source, or of a
preset's random weights (the very weights memwise.load draws for the preset: the same seed, the same
order). The timed fresh process only loads that file and generates.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from memwise.bench.gguf_export import _model_key
from memwise.bench.sources import Source
from memwise.bench.timing import GenerationTiming

PACKED_CACHE_VERSION = 1    # part of every cached directory's name: a change of format writes new ones


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memwise" / "packed"


def packed_checkpoint(source: str, directory: Path | None = None) -> Path:
    """A packed checkpoint directory of `source`: a packed checkpoint itself, else the cached conversion
    (written first when missing, atomically)."""
    from memwise.checkpoint import CheckpointReader
    from memwise.models.ternary.packed_format import is_packed
    from memwise.source import resolve_model

    resolved = resolve_model(source)
    if resolved.directory is not None and is_packed(CheckpointReader(resolved.directory)):
        return resolved.directory
    key = _model_key(source, resolved.directory, resolved.config)
    out = (directory or cache_dir()) / key / f"v{PACKED_CACHE_VERSION}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if resolved.directory is not None:
        from memwise.convert import convert

        return convert(str(resolved.directory), out, progress=False)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _write_preset(resolved, partial)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


@dataclasses.dataclass(frozen=True)
class _Stored:
    dtype: Any


class _PresetHeader:
    """What the packed writer asks a checkpoint's header, answered for a preset's random weights: the
    embedding in bfloat16, every other plain tensor in float32 (memwise.models.ternary.RandomWeights)."""

    def __init__(self, where: str, embeddings: tuple[str, ...]):
        self.directory = where
        self.embeddings = embeddings

    def expect(self, name: str, shape: tuple[int, ...], floating: bool = False) -> _Stored:
        import torch

        return _Stored(torch.bfloat16 if name in self.embeddings else torch.float32)


def _write_preset(resolved: Any, out: Path) -> None:
    from memwise.models.ternary import RandomWeights, write_packed

    # The family's synthetic() source with memwise.load's seed 0; the writer draws the tensors in the
    # order of the layout, which is the order the model builder draws them.
    if resolved.spec.model_type == "hgrn_bit":
        from memwise.models.hgrn_bit import checkpoint_layout

        embeddings: tuple[str, ...] = ("model.embeddings.weight",)
        source = RandomWeights(0, embeddings=embeddings, zeros=("model.lower_bounds",))
    else:
        from memwise.models.bitnet import checkpoint_layout
        from memwise.models.bitnet.build import EMBEDDINGS as embeddings

        source = RandomWeights(0, embeddings=embeddings)
    write_packed(checkpoint_layout(resolved.spec), source, _PresetHeader(resolved.where, embeddings),
                 resolved.config, out, progress=False)


def _lite_family(config: dict[str, Any] | None) -> str | None:
    """The family memwise.lite would run for this config.json, or None (1bitLLM's BitNet says "llama")."""
    from memwise.errors import UnsupportedError
    from memwise.lite.loader import FAMILIES
    from memwise.models import family_for_config

    if config is None:
        return None
    try:
        return FAMILIES.get(family_for_config(config, "config.json").__name__)
    except UnsupportedError:
        return None


class LiteEngine:
    name = "memwise-lite"
    uses_torch = False      # the cell leaves torch out of this process (see cell.py)

    def __init__(self) -> None:
        self.model: Any = None
        self.path: Path | None = None
        self.threads: int | None = None

    def can_run(self, source: Source, device: str) -> str | None:
        if _lite_family(source.config) is None:
            return "memwise-lite runs ternary (hgrn_bit, bitnet) models only"
        if device != "cpu":
            return "memwise-lite runs on the CPU only"
        return None

    def cell_reason(self, spec: Any) -> str | None:
        """Why memwise-lite cannot run this cell's settings, or None."""
        if spec.dtype != "float32" or spec.quantize or spec.kv_cache or spec.max_memory:
            return "memwise-lite runs ternary models in float32 with their packed weights only"
        if (spec.repetition_penalty or 1.0) != 1.0 or spec.no_repeat_ngram_size:
            return "memwise-lite runs plain greedy decoding (no repetition penalty or n-gram block)"
        return None

    def prepare(self, source: Source, spec: Any) -> str:
        """In the parent, before the cell: the packed checkpoint the cell loads."""
        return str(packed_checkpoint(source.source))

    def configure(self, spec: Any) -> None:
        if not spec.engine_file:
            raise RuntimeError("no packed checkpoint was prepared for this cell (run it through memwise bench)")
        self.path = Path(spec.engine_file)
        self.threads = spec.threads or len(os.sched_getaffinity(0))

    def load(self, source: Source, dtype: str, device: str) -> None:
        import memwise.lite

        self.model = memwise.lite.load(self.path, threads=self.threads)

    def generate(self, input_ids: Any, options: Any) -> GenerationTiming:
        start = time.perf_counter()
        first = None
        steps = 0
        for _ in self.model.stream(input_ids, options.max_new_tokens, ignore_eos=True,
                                   min_new_tokens=options.min_new_tokens):
            if first is None:
                first = time.perf_counter()
            steps += 1
        end = time.perf_counter()
        return GenerationTiming((first or end) - start, end - start, steps)

    def weights_bytes(self) -> int:
        return self.model.weights_bytes()

    def decode_bytes_per_token(self) -> int:
        return self.model.decode_bytes_per_token()

    def vocab_size(self) -> int:
        return int(self.model.spec.vocab_size)

    def describe(self) -> dict[str, Any]:
        hgrn = self.model.spec.model_type == "hgrn_bit"
        prefill = "multi-row BitLinear + numpy" if hgrn else "multi-row BitLinear + C attention + numpy"
        return {"weights_format": "2-bit packed", "threads": self.threads,
                "engine_details": {"runtime": "memwise.lite (numpy + C extensions, no torch)",
                                   "torch_in_process": "torch" in sys.modules,
                                   "packed_checkpoint": str(self.path), "isa": self.model.isa,
                                   "decoding": "greedy, EOS ignored; decode: fused C step; prefill: " + prefill}}
