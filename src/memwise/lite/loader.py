"""memwise.lite.load: a packed checkpoint's family from its config.json, its weights read, its model made."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from memwise import kernels
from memwise.errors import SourceError, UnsupportedError, shown
from memwise.lite import bitnet_model
from memwise.lite.bitnet_model import BitNetLiteModel
from memwise.lite.bitnet_weights import LM_HEAD, BitNetWeights
from memwise.lite.hgrn_weights import HGRNWeights
from memwise.lite.model import LiteModel
from memwise.lite.packed_file import WEIGHTS_FILE, PackedFile
from memwise.models.bitnet import spec_from_config as bitnet_spec
from memwise.models.bitnet import step_structs as bitnet_structs
from memwise.models.hgrn_bit import step_structs
from memwise.models.hgrn_bit.config import spec_from_config
from memwise.presets import is_preset
from memwise.source import read_source
from memwise.tokenizer import load_tokenizer

# The families memwise.lite runs, by the memwise.models package that reads their config.json.
FAMILIES = {"memwise.models.hgrn_bit": "hgrn_bit", "memwise.models.bitnet": "bitnet"}


def load(source: str | os.PathLike, threads: int | None = None) -> LiteModel:
    """A packed checkpoint (`memwise convert` output: a directory or a hub id) of a ternary model
    (HGRN-Bit or BitNet b1.58), ready to generate without torch. `threads`: the C code's threads
    (default: every CPU this process may use, fewer while other processes keep cores busy)."""
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else source
    if isinstance(text, str) and is_preset(text):
        raise SourceError(f"{text}: memwise.lite runs packed checkpoints; a preset has no file (write one with "
                          "`memwise convert`, or run presets with memwise.load)")
    config, where, directory = read_source(text)
    family = _family(config, where)
    if not (kernels.HAVE_C and _step_extension(family) is not None):
        raise UnsupportedError("memwise.lite needs memwise's C extensions, which are not built here "
                               "(python setup.py build_ext --inplace, or reinstall memwise with a C compiler)")
    assert directory is not None
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise SourceError(f"{directory}: no {WEIGHTS_FILE} (memwise.lite reads the single packed file that "
                          "`memwise convert` writes)")
    if family == "hgrn_bit":
        step_structs.checked_layout()
        spec = spec_from_config(config, where)
        weights = HGRNWeights(spec, PackedFile(path))
        return LiteModel(spec, weights, load_tokenizer(Path(directory), spec.bos_token_id), threads)
    return _load_bitnet(config, where, Path(directory), path, threads)


def _family(config: dict, where: str) -> str:
    """"hgrn_bit" or "bitnet" (model_type bitnet, or 1bitLLM's llama + BitnetForCausalLM), else an error."""
    from memwise.models import family_for_config

    try:
        family = FAMILIES.get(family_for_config(config, where).__name__)
    except UnsupportedError:
        family = None
    if family is None:
        raise UnsupportedError(f"{where}: memwise.lite runs {', '.join(FAMILIES.values())} models, not model_type "
                               f"{shown(config.get('model_type'))} (memwise.load runs every family)")
    return family


def _step_extension(family: str) -> Any:
    if family == "hgrn_bit":
        return step_structs._step
    return bitnet_structs._step if bitnet_model._bf16 is not None else None


def _load_bitnet(config: dict, where: str, directory: Path, path: Path, threads: int | None) -> LiteModel:
    bitnet_structs.checked_layout()
    if not hasattr(bitnet_structs._step, "attend"):
        raise UnsupportedError("memwise.models.bitnet._step was built before its prefill attention (attend); "
                               "rebuild it: python setup.py build_ext --inplace")
    spec = dataclasses.replace(bitnet_spec(config, where), source=str(directory))
    file = PackedFile(path)
    if spec.model_type == "llama" and not spec.tie_word_embeddings and LM_HEAD not in file.entries:
        # 1bitLLM's checkpoints hold no lm_head: their output is the embedding (as memwise.models.bitnet.build).
        spec = dataclasses.replace(spec, tie_word_embeddings=True)
    weights = BitNetWeights(spec, file)
    return BitNetLiteModel(spec, weights, load_tokenizer(directory, spec.bos_token_id), threads)
