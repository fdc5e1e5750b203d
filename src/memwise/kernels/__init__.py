"""memwise's model-free kernel library: int8 x 2-bit ternary products, BitLinear, quantization, argmax.

Backends:

* ``"c"``: the optional extension ``memwise.kernels._ternary`` (built by setup.py from csrc/). It
  has one path per instruction set (``isa_paths()``: "amx", "avx512vnni", "avxvnni", "avx2",
  "scalar"), chosen at run time, multi-threaded with OpenMP over output rows using
  ``torch.get_num_threads()`` threads, and it releases the GIL. One activation row (decode) is a
  GEMV that streams the packed weights once; several rows share each unpacked weight block.
* ``"triton"``: ``memwise.kernels.triton_ternary``, for CUDA tensors when triton is installed.
* ``"reference"``: the plain PyTorch code of ``memwise.kernels.packed``; the fallback everywhere.

Exactness. The integer product is exact on every path (int32 accumulators, identical to
``ternary_matmul_reference``). RMSNorm, the int8 quantization and the rescale around it are float
work in the kernels' own order: they agree with the reference to rounding, so now and then an
activation within an ulp of a rounding boundary lands one int8 step away, and that row's output
moves by about one quantization step.

Model code reaches the C paths through ``isa_id``, ``resolve_isa`` and ``num_threads``; the packed
format is documented in ``memwise.kernels.packed``.

This module imports no torch: the instruction-set choice and the raw C entry points serve the
torch-free runtime (memwise.lite) too. The torch-facing products live in ``memwise.kernels.ternary``
and the reference in ``memwise.kernels.packed``; their names are offered here on first use.
"""
from __future__ import annotations

import importlib
import os

from memwise.errors import MemwiseError, UnsupportedError
from memwise.kernels.bandwidth import last_level_cache_bytes, read_bandwidth_bytes_per_s

try:
    from memwise.kernels import _ternary as _c
except ImportError:  # no compiler at install time: everything runs on the reference
    _c = None

HAVE_C: bool = _c is not None

# Best first. Ids match the enum in common.h.
_ISA_IDS = {"amx": 4, "avx512vnni": 3, "avxvnni": 2, "avx2": 1, "scalar": 0}
BACKENDS = ("auto", "c", "triton", "reference")
ARGMAX_PARALLEL_FROM = 1 << 20
MAX_COLS = 1 << 22  # int32 lane accumulators of the AVX-512 path stay exact below this K

__all__ = ["HAVE_C", "BACKENDS", "MAX_COLS", "KernelInputError", "bitlinear", "ternary_matmul", "quantize_rows",
           "greedy_tokens", "isa_paths", "isa_id", "resolve_isa", "num_threads", "read_bandwidth_bytes_per_s",
           "last_level_cache_bytes", "have_triton"]


class KernelInputError(MemwiseError, ValueError):
    """A kernel got a tensor of the wrong dtype, shape, layout or device."""


# --------------------------------------------------------------------------------------------
# Instruction-set paths


_machine_cache: list[str] | None = None


def _machine_isas() -> list[str]:
    global _machine_cache
    if not HAVE_C:
        return ["scalar"]
    if _machine_cache is None:
        _machine_cache = [name for name, ident in _ISA_IDS.items() if _c.isa_supported(ident)]
    return list(_machine_cache)


def isa_paths() -> list[str]:
    """Instruction-set paths this machine runs, best first, ending with "scalar".

    MEMWISE_ISA=<name> restricts this to that path (and "scalar"). Without the C extension the
    only path is "scalar", which then means the PyTorch reference.
    """
    available = _machine_isas()
    forced = os.environ.get("MEMWISE_ISA", "").strip().lower()
    if not forced:
        return available
    if forced not in available:
        raise UnsupportedError(
            f"MEMWISE_ISA={forced!r} is not available here (available: {', '.join(available)})"
            + ("" if HAVE_C else "; the C extension is not built"))
    return [forced] if forced == "scalar" else [forced, "scalar"]


def resolve_isa(isa: str | None) -> str:
    """The name of the path `isa` (default: MEMWISE_ISA or the best one), checked against this machine."""
    paths = isa_paths()
    if isa is None:
        return paths[0]
    name = isa.strip().lower()
    if name not in _ISA_IDS:
        raise KernelInputError(f"unknown isa {isa!r} (known: {', '.join(_ISA_IDS)})")
    if name not in _machine_isas():
        raise UnsupportedError(f"isa {name!r} is not available here "
                               f"(available: {', '.join(_machine_isas())})")
    return name


def isa_id(name: str) -> int:
    """The C extension's id of an instruction-set path (common.h's enum)."""
    return _ISA_IDS[name]


def num_threads() -> int:
    """Threads the C kernels use: torch's setting, so that one knob governs both."""
    import torch

    return max(1, torch.get_num_threads())


# Names that need torch, and the module that defines each: imported when first asked for, so that
# `import memwise.kernels` (and the torch-free runtime) never pays for torch.
_LAZY = {**dict.fromkeys(("ternary_matmul", "bitlinear", "quantize_rows", "greedy_tokens", "have_triton"),
                         "memwise.kernels.ternary"),
         **dict.fromkeys(("BLOCK_BYTES", "TernaryMatrix", "bitlinear_reference", "padded_cols", "quantize_activations",
                          "rmsnorm", "ternary_matmul_reference"), "memwise.kernels.packed")}
_SUBMODULES = ("packed", "ternary", "threads", "structs", "dense", "bf16", "int8", "int4", "nf4", "kv_quant",
               "triton_ternary")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
