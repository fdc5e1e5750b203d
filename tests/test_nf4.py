"""NF4 weights against bitsandbytes itself (its CPU quantize_4bit / dequantize_4bit), and the C product
against the PyTorch reference."""
from __future__ import annotations

import os

import pytest
import torch

from memwise import kernels
from memwise.kernels import nf4
from memwise.kernels.nf4 import Nf4Matrix

PATHS = kernels.isa_paths() if not os.environ.get("MEMWISE_ISA") else kernels._machine_isas()


def _bnb():
    try:
        import bitsandbytes.functional as functional
    except Exception as error:  # noqa: BLE001 - any import failure (missing, no CPU library)
        pytest.skip(f"bitsandbytes cannot be imported ({type(error).__name__}: {error})")
    return functional


# scales from a checkpoint's (0.02) to unit; several 256-block groups of absmax; K padded (100, 200);
# a single block; a zero block (the 1e-38 floor); outliers
CASES = [(7, 64, 0.02, 0), (13, 128, 1.0, 1), (300, 1024, 0.05, 2), (64, 4096, 0.02, 3), (5, 100, 1.0, 4),
         (33, 200, 0.3, 5), (1, 64, 1.0, 6)]


def _weights(n: int, k: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    if n > 2:
        w[1, :64] = 0.0
        w[2, 5] = 40 * scale
    return w


@pytest.mark.parametrize("n,k,scale,seed", CASES)
def test_codes_and_constants_identical_to_bitsandbytes(n: int, k: int, scale: float, seed: int) -> None:
    functional = _bnb()
    w = _weights(n, k, scale, seed)
    mine = Nf4Matrix.from_float(w)
    padded = torch.nn.functional.pad(w, (0, nf4.padded_cols(k) - k))
    packed, state = functional.quantize_4bit(padded, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed.view(-1), mine.codes.view(-1))
    assert torch.equal(state.absmax, mine.qabs)
    assert torch.equal(state.state2.absmax, mine.absmax2)
    assert torch.equal(state.offset.reshape(()), mine.offset.reshape(()))
    assert torch.equal(state.state2.code, nf4.CODE8) and state.state2.blocksize == 256
    assert torch.equal(state.code, nf4.NF4_VALUES)
    assert torch.equal(functional.dequantize_4bit(packed, state), mine.dequantize(padded=True))


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("n,k,scale,seed", CASES[:4])
def test_kernel_dequantizes_exactly_as_bitsandbytes(isa: str, n: int, k: int, scale: float, seed: int) -> None:
    """x = the identity picks each weight out alone (w * 1 plus exact zeros): the C path's in-register
    weights equal bitsandbytes' dequantize_4bit bit for bit."""
    functional = _bnb()
    w = _weights(n, k, scale, seed)
    mine = Nf4Matrix.from_float(w)
    packed, state = functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    picked = nf4.nf4_linear(torch.eye(k), mine, isa=isa).T
    assert torch.equal(picked, functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("m,n,k", [(1, 37, 300), (4, 9, 64), (2, 130, 1024), (3, 5, 4096)])
def test_linear_matches_reference(isa: str, m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    w, x, bias = torch.randn(n, k, generator=g), torch.randn(m, 2, k, generator=g), torch.randn(n, generator=g)
    weight = Nf4Matrix.from_float(w)
    out, ref = nf4.nf4_linear(x, weight, bias, isa=isa), nf4.nf4_linear_reference(x, weight, bias)
    assert out.shape == (m, 2, n)
    # float32 sums of k products in another order: a few ulps of the sum of |terms|
    bound = 4 * k * 2.0 ** -24 * (x.abs() @ weight.dequantize().abs().T).max()
    assert float((out - ref).abs().max()) <= float(bound)


def test_dynamic_map_matches_bitsandbytes() -> None:
    functional = _bnb()
    assert torch.equal(nf4.dynamic_map(), functional.create_dynamic_map())


def test_quantization_error_is_within_a_block_step() -> None:
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(9))
    m = Nf4Matrix.from_float(w)
    gaps = (nf4.NF4_VALUES[1:] - nf4.NF4_VALUES[:-1]).max()
    absmax = w.view(-1, 64).abs().amax(dim=-1).repeat_interleave(64).view(16, 256)
    # half the widest NF4 gap times the block absmax, plus the 8-bit absmax rounding (< 1%)
    assert bool(((m.dequantize() - w).abs() <= absmax * (gaps / 2 + 0.01)).all())
    assert m.nbytes == 16 * 128 + 64 + 4 + 4


def test_bad_inputs_are_one_clear_error() -> None:
    weight = Nf4Matrix.from_float(torch.randn(4, 10))
    with pytest.raises(kernels.KernelInputError, match=r"float tensor \[\.\.\., 10\]"):
        nf4.nf4_linear(torch.zeros(1, 11), weight)
    with pytest.raises(kernels.KernelInputError, match=r"bias must be float32 \[4\]"):
        nf4.nf4_linear(torch.zeros(1, 10), weight, torch.zeros(5))
    broken = Nf4Matrix(weight.codes, weight.qabs[:2], weight.absmax2, weight.offset, 4, 10)
    with pytest.raises(kernels.KernelInputError, match=r"qabs of a 4x10 matrix must be contiguous uint8 \[4\]"):
        nf4.nf4_linear(torch.zeros(1, 10), broken)


def test_reference_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = Nf4Matrix.from_float(torch.randn(6, 70))
    x = torch.randn(3, 70)
    with_c = nf4.nf4_linear(x, weight)
    monkeypatch.setattr(nf4, "_c", None)
    torch.testing.assert_close(nf4.nf4_linear(x, weight), with_c, rtol=1e-5, atol=1e-5)
