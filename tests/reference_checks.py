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


def decode_side_by_side(module, ids: torch.Tensor, steps: int, run: Callable[..., torch.Tensor], rel: float) -> None:
    """Prefill two caches of `module` the same way on the reference path, then feed the same tokens
    through the fused step and the reference path; logits and the cache rows written agree to `rel`
    (of their spread) at every step. run(fused, *args, **kwargs) calls module on the path chosen."""
    caches = {on: module.new_cache(1, ids.shape[1] + steps + 3) for on in (False, True)}
    logits = {on: run(False, ids, caches[on], last_only=True) for on in (False, True)}
    for _ in range(steps):
        token = logits[False][:, -1].argmax(-1, keepdim=True)
        logits = {on: run(on, token, caches[on], last_only=True) for on in (False, True)}
        assert logits[True].shape == logits[False].shape == (1, 1, module.spec.vocab_size)
        assert_close(logits[True], logits[False], rel)
    ref, got = caches[False], caches[True]
    assert got.length == ref.length == ids.shape[1] + steps
    assert torch.equal(got.mask, ref.mask) and torch.equal(got.real_count, ref.real_count)
    for n in range(module.spec.num_layers):
        assert_close(got.keys[n][:, :, :got.length], ref.keys[n][:, :, :ref.length], rel)
        assert_close(got.values[n][:, :, :got.length], ref.values[n][:, :, :ref.length], rel)
