"""How float results of the C paths are compared with the PyTorch reference.

Integer products are compared bit for bit elsewhere. Float work (RMSNorm, int8 quantization, exp, the
recurrence) runs in each path's own order, so results agree to rounding: the difference is measured
against the spread of the reference values (max - min), as llama.cpp's backend tests measure
errors against the magnitude of the output rather than element by element.
"""
from __future__ import annotations

from typing import Callable

import torch


def spread(values: torch.Tensor) -> float:
    return float(values.max() - values.min())


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """max |got - want| <= rel * spread(want), and the same shape, dtype and non-finite places."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    finite = torch.isfinite(want)
    diff = float((got[finite] - want[finite]).abs().max()) if bool(finite.any()) else 0.0
    assert diff <= rel * spread(want[finite]), f"max |diff| {diff:.3g} > {rel} x spread {spread(want[finite]):.3g}"


# One int8 step of one activation moves a BitLinear output by m / s times one ternary weight: at most
# 1/127 of the row's largest input's share. Rounding differences move a few activations of a row.
BITLINEAR_REL = 2 / 127


def assert_same_on_thread_counts(run: Callable[[], torch.Tensor], counts: tuple[int, ...] = (1, 2, 3)) -> None:
    """run() gives bit-identical results on each torch thread count (the C paths split their work by
    it); torch's count is restored after."""
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in counts:
            torch.set_num_threads(n)
            outs.append(run())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)
