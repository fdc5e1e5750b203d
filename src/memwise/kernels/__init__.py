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
"""
from __future__ import annotations

import os

import torch

from memwise.errors import MemwiseError, UnsupportedError
from memwise.kernels.bandwidth import last_level_cache_bytes, read_bandwidth_bytes_per_s
from memwise.kernels.packed import (BLOCK_BYTES, TernaryMatrix, bitlinear_reference, padded_cols,
                             quantize_activations, rmsnorm, ternary_matmul_reference)

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
    return max(1, torch.get_num_threads())


# --------------------------------------------------------------------------------------------
# Validation


def _check_weight(weight: TernaryMatrix, device: torch.device) -> None:
    if not isinstance(weight, TernaryMatrix):
        raise KernelInputError(f"weight must be a TernaryMatrix, got {type(weight).__name__}")
    p = weight.packed
    want = (weight.rows, padded_cols(weight.cols) // 4)
    if p.dtype != torch.uint8:
        raise KernelInputError(f"packed ternary weights must be uint8, got {p.dtype}")
    if tuple(p.shape) != want:
        raise KernelInputError(f"packed ternary weights of a {weight.rows}x{weight.cols} matrix must "
                               f"have shape {list(want)}, got {list(p.shape)}")
    if not p.is_contiguous():
        raise KernelInputError("packed ternary weights must be contiguous (row-major)")
    if weight.cols < 1 or weight.rows < 1:
        raise KernelInputError(f"ternary matrix must be non-empty, got {weight.rows}x{weight.cols}")
    if p.device != device:
        raise KernelInputError(f"packed ternary weights are on {p.device}, activations on {device}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise KernelInputError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "c" and not HAVE_C:
        raise UnsupportedError("backend 'c' requested but the C extension memwise.kernels._ternary "
                               "is not built (pip install -e . or python setup.py build_ext --inplace)")


def have_triton() -> bool:
    """Whether the Triton kernels can run (triton importable)."""
    from memwise.kernels import triton_ternary
    return triton_ternary.AVAILABLE


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend == "auto" and device.type != "cuda":
        return False
    if backend == "triton":
        if not have_triton():
            raise UnsupportedError("backend 'triton' requested but triton is not installed")
        return True
    return backend == "auto" and device.type == "cuda" and have_triton()


def _use_c(backend: str, device: torch.device) -> bool:
    if backend == "c" and device.type != "cpu":
        raise KernelInputError(f"backend 'c' runs on CPU tensors, got a tensor on {device}")
    return HAVE_C and device.type == "cpu" and backend in ("auto", "c")


# --------------------------------------------------------------------------------------------
# Public kernels


def ternary_matmul(q: torch.Tensor, weight: TernaryMatrix, isa: str | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Exact q [M, K] int8 x t [N, K] ternary -> int32 [M, N] (t = the weight's ternary values).

    `isa` picks a C path (default: MEMWISE_ISA or the best one); "scalar" without the extension
    means the reference.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise KernelInputError(f"activations must be an int8 tensor, got "
                               f"{getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() != 2:
        raise KernelInputError(f"activations must be 2-d [M, K], got shape {list(q.shape)}")
    _check_weight(weight, q.device)
    _check_backend(backend)
    if q.shape[1] != weight.cols:
        raise KernelInputError(f"activations have K={q.shape[1]} columns, the ternary matrix "
                               f"{weight.rows}x{weight.cols} expects {weight.cols}")
    name = resolve_isa(isa)
    m, n = q.shape[0], weight.rows
    if _use_triton(backend, q.device):
        from memwise.kernels import triton_ternary
        return triton_ternary.ternary_matmul(q.contiguous(), weight)
    if not _use_c(backend, q.device):
        return ternary_matmul_reference(q, weight.ternary())
    if weight.cols >= MAX_COLS:
        raise KernelInputError(f"K={weight.cols} is too large for the C kernels (limit {MAX_COLS})")
    out = torch.empty((m, n), dtype=torch.int32)
    if m == 0:
        return out
    q = q.contiguous()
    _c.matmul(_ISA_IDS[name], weight.packed.data_ptr(), n, weight.packed.shape[1] // BLOCK_BYTES,
              q.data_ptr(), m, weight.cols, out.data_ptr(), num_threads())
    return out


def _check_bitlinear_inputs(x: torch.Tensor, norm_weight: torch.Tensor, cols: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise KernelInputError(f"BitLinear input must be a floating-point tensor, got "
                               f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != cols:
        raise KernelInputError(f"BitLinear input has last dimension {x.shape[-1] if x.dim() else None},"
                               f" the ternary matrix expects K={cols}")
    if (not isinstance(norm_weight, torch.Tensor) or not norm_weight.is_floating_point()
            or tuple(norm_weight.shape) != (cols,)):
        raise KernelInputError(f"BitLinear norm weight must be a float tensor of shape [{cols}], got "
                               f"{list(getattr(norm_weight, 'shape', []))}")
    if norm_weight.device != x.device:
        raise KernelInputError(f"norm weight is on {norm_weight.device}, input on {x.device}")


def bitlinear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: TernaryMatrix,
              backend: str = "auto") -> torch.Tensor:
    """BitLinear: rmsnorm(x) * g -> per-row int8 -> exact ternary product -> acc * m / s.

    x [..., K] (any float dtype; computed in float32 like the reference) -> float32 [..., N].
    """
    _check_bitlinear_inputs(x, norm_weight, weight.cols)
    _check_weight(weight, x.device)
    _check_backend(backend)
    if _use_triton(backend, x.device):
        from memwise.kernels import triton_ternary
        return triton_ternary.bitlinear(x, norm_weight, eps, weight)
    if not _use_c(backend, x.device):
        return bitlinear_reference(x, norm_weight, eps, weight)
    if weight.cols >= MAX_COLS:
        raise KernelInputError(f"K={weight.cols} is too large for the C kernels (limit {MAX_COLS})")
    rows = (x if x.dim() == 2 else x.reshape(-1, weight.cols)).float().contiguous()
    g = norm_weight.float().contiguous()
    out = torch.empty((rows.shape[0], weight.rows), dtype=torch.float32)
    if rows.shape[0]:
        _c.bitlinear(_ISA_IDS[isa_paths()[0]], weight.packed.data_ptr(), weight.rows,
                     weight.packed.shape[1] // BLOCK_BYTES, float(weight.scale), rows.data_ptr(),
                     rows.shape[0], weight.cols, g.data_ptr(), float(eps), out.data_ptr(), num_threads())
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.rows)


def quantize_rows(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The activation half of BitLinear: (q int8 [M, K], s float32 [M, 1]) for x [M, K].

    The C kernels fuse this into bitlinear(); it is exposed to compare their q with the reference's.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise KernelInputError(f"quantize_rows expects a 2-d tensor [M, K], got "
                               f"{list(getattr(x, 'shape', []))}")
    _check_bitlinear_inputs(x, norm_weight, x.shape[1])
    _check_backend(backend)
    if not _use_c(backend, x.device) or backend == "triton":
        return quantize_activations(rmsnorm(x, norm_weight, eps))
    rows = x.float().contiguous()
    g = norm_weight.float().contiguous()
    q = torch.empty(rows.shape, dtype=torch.int8)
    s = torch.empty((rows.shape[0], 1), dtype=torch.float32)
    if rows.numel():
        _c.quantize(rows.data_ptr(), rows.shape[0], rows.shape[1], g.data_ptr(), float(eps), q.data_ptr(),
                    s.data_ptr())
    return q, s


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.max(dim=-1).indices (first largest, or first NaN) of float32 [B, V] logits, int64 [B].

    In C when the extension is built and the logits are a contiguous CPU float32 matrix: threads
    scan the columns that a fused decode step's lm_head gave them, so each reads logits still in
    its own cache, where torch's reduction reads half of them from the other core.
    """
    if (_c is None or logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu"
            or not logits.is_contiguous() or logits.shape[1] == 0):
        return logits.max(dim=-1).indices
    out = torch.empty(logits.shape[0], dtype=torch.long)
    if logits.shape[0]:
        # Below a million logits one thread scans them in microseconds, and a parallel region
        # would wait, once per token, for a second thread that a busy machine may have descheduled.
        threads = num_threads() if logits.numel() >= ARGMAX_PARALLEL_FROM else 1
        _c.argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(), threads)
    return out
