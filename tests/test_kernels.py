"""memwise.kernels: exact int8 x ternary products on every ISA path, BitLinear close to the reference."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memwise import kernels
from memwise.errors import MemwiseError, UnsupportedError
from memwise.bench import kernels as bench
from memwise.kernels.packed import (TernaryMatrix, bitlinear_reference, pack_ternary, quantize_activations,
                                    rmsnorm, ternary_matmul_reference)

from reference_checks import BITLINEAR_REL, assert_close

SRC = str(Path(__file__).resolve().parents[1] / "src")
PATHS = kernels.isa_paths() if not os.environ.get("MEMWISE_ISA") else kernels._machine_isas()

# (M, N, K): K below one block, odd block counts (the AVX-512 path loads blocks in pairs), K and N
# off every tile size, M from 1 to 17 (4-row GEMM tiles plus each remainder), and M of 3 and 5
# AMX tiles (the AMX path splits its sums differently for 1, 2 and 3-4 tiles of 16 rows); panels of
# 16 weight rows with a partial last one and K over several unpacked chunks with a partial last one
# (the AVX-512 path from 4 rows); one GEMV long enough per thread for its far prefetches.
SHAPES = [(1, 1, 1), (1, 5, 7), (2, 3, 127), (1, 4, 128), (3, 9, 129), (4, 8, 256), (5, 7, 300),
          (6, 13, 383), (7, 4, 640), (8, 17, 1000), (9, 6, 130), (11, 5, 64), (13, 33, 515),
          (16, 12, 257), (17, 19, 700), (1, 67, 2560), (1, 515, 2560), (12, 40, 2817), (40, 20, 300),
          (70, 18, 260)]


def random_case(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    # The int8 extremes, where unsigned-by-signed tricks go wrong if they are going to.
    q[0, : min(k, 3)] = -128
    q[-1, -min(k, 3):] = 127
    return q, t


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matmul_exact_on_every_isa(isa: str, m: int, n: int, k: int) -> None:
    q, t = random_case(m, n, k, seed=m * 1000 + n * 10 + k)
    weight = TernaryMatrix.from_ternary(t, 0.5)
    out = kernels.ternary_matmul(q, weight, isa=isa)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, ternary_matmul_reference(q, t))


@pytest.mark.parametrize("isa", PATHS)
def test_matmul_exact_on_long_rows(isa: str) -> None:
    # Rows of about 2^19 weights: sums far past the int16 range, an odd number of blocks on
    # either side (the AMX path's last pair of blocks is then a half), exact on every path.
    for k in (4095 * 128, 4096 * 128 + 100):  # 4095 and 4097 blocks
        q, t = random_case(6, 3, k, seed=k)
        out = kernels.ternary_matmul(q, TernaryMatrix.from_ternary(t, 1.0), isa=isa)
        # The float32 reference stops at K = 2^17; int64 sums are exact at any length.
        want = (q.to(torch.int64)[:, None, :] * t.to(torch.int64)[None, :, :]).sum(-1)
        assert torch.equal(out.to(torch.int64), want)


@pytest.mark.parametrize("isa", PATHS)
def test_matmul_extreme_accumulators(isa: str) -> None:
    # Rows of all -1 / all +1 against rows of all -128 / all 127 give the largest sums; a K this
    # long also runs many iterations through the int32 lane accumulators.
    k = 20000
    t = torch.stack([torch.full((k,), -1), torch.full((k,), 1), torch.zeros(k),
                     torch.randint(-1, 2, (k,))]).to(torch.int8)
    q = torch.stack([torch.full((k,), -128), torch.full((k,), 127),
                     torch.randint(-128, 128, (k,))]).to(torch.int8)
    out = kernels.ternary_matmul(q, TernaryMatrix.from_ternary(t, 1.0), isa=isa)
    assert out[0, 0].item() == 128 * k and out[0, 1].item() == -128 * k
    assert out[1, 1].item() == 127 * k and out[2, 2].item() == 0
    assert torch.equal(out, ternary_matmul_reference(q, t))
    # One row at a time takes the GEMV kernels, whose sums (AVX2: 16-bit lanes over 8 blocks) meet
    # their bounds exactly here: codes 2 against -128 everywhere.
    for row in range(q.shape[0]):
        single = kernels.ternary_matmul(q[row:row + 1], TernaryMatrix.from_ternary(t, 1.0), isa=isa)
        assert torch.equal(single, out[row:row + 1])


def test_isa_paths_shape() -> None:
    paths = kernels.isa_paths()
    assert paths[-1] == "scalar"
    order = list(kernels._ISA_IDS)
    assert [order.index(p) for p in paths] == sorted(order.index(p) for p in paths)
    if not kernels.HAVE_C:
        assert paths == ["scalar"]


@pytest.mark.parametrize("isa", PATHS)
def test_env_forces_isa(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWISE_ISA", isa)
    assert kernels.isa_paths()[0] == isa
    q, t = random_case(3, 10, 300, seed=7)
    weight = TernaryMatrix.from_ternary(t, 0.25)
    assert torch.equal(kernels.ternary_matmul(q, weight), ternary_matmul_reference(q, t))
    x = torch.randn(3, 300)
    g = torch.rand(300) + 0.5
    assert_close(kernels.bitlinear(x, g, 1e-6, weight), bitlinear_reference(x, g, 1e-6, weight), BITLINEAR_REL)


def test_env_rejects_unknown_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWISE_ISA", "avx9000")
    with pytest.raises(MemwiseError, match="MEMWISE_ISA='avx9000'.*available: .*scalar"):
        kernels.isa_paths()
    q, t = random_case(1, 4, 64, seed=1)
    with pytest.raises(MemwiseError, match="avx9000"):
        kernels.ternary_matmul(q, TernaryMatrix.from_ternary(t, 1.0))


def test_unavailable_isa_is_a_clear_error() -> None:
    missing = [name for name in kernels._ISA_IDS if name not in kernels._machine_isas()]
    if not missing:
        pytest.skip("this machine runs every ISA path")
    q, t = random_case(1, 4, 64, seed=1)
    with pytest.raises(UnsupportedError, match=f"isa '{missing[0]}' is not available"):
        kernels.ternary_matmul(q, TernaryMatrix.from_ternary(t, 1.0), isa=missing[0])


def test_result_does_not_depend_on_thread_count() -> None:
    q, t = random_case(9, 37, 900, seed=3)
    weight = TernaryMatrix.from_ternary(t, 0.3)
    x = torch.randn(9, 900)
    g = torch.rand(900)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((kernels.ternary_matmul(q, weight), kernels.bitlinear(x, g, 1e-5, weight)))
    finally:
        torch.set_num_threads(before)
    for acc, out in results[1:]:
        assert torch.equal(acc, results[0][0]) and torch.equal(out, results[0][1])


# ---------------------------------------------------------------------------------------------
# BitLinear


BITLINEAR_SHAPES = [((1, 7), 5), ((2, 3, 8), 4), ((5, 9), 6), ((4, 100), 33), ((3, 257), 130),
                    ((2, 1, 1024), 64), ((1, 2560), 40), ((17, 384), 9), ((2, 6912), 5)]


def bitlinear_case(shape: tuple[int, ...], n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    k = shape[-1]
    # Rows of very different scales, as hidden states are.
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[-2] if len(shape) > 1 else 1
                                                           ).reshape(*([1] * (len(shape) - 2)), -1, 1)
    g = torch.rand(k, generator=gen) * 2 - 0.5
    latent = torch.randn(n, k, generator=gen)
    return x, g, TernaryMatrix.from_latent(latent)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("shape,n", BITLINEAR_SHAPES)
def test_bitlinear_matches_reference(isa: str, shape: tuple[int, ...], n: int,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWISE_ISA", isa)
    x, g, weight = bitlinear_case(shape, n, seed=sum(shape) + n)
    got = kernels.bitlinear(x, g, 1e-6, weight)
    want = bitlinear_reference(x, g, 1e-6, weight)
    assert got.dtype == torch.float32 and got.shape == (*shape[:-1], n)
    assert_close(got, want, BITLINEAR_REL)


def test_quantized_activations_match_reference() -> None:
    # Rounding in another order moves an activation that sits within an ulp of a rounding
    # boundary by one step, rarely; the scales agree to float rounding.
    gen = torch.Generator().manual_seed(11)
    for k in (1, 5, 8, 9, 31, 100, 1024, 2816, 5632):
        x = torch.randn(6, k, generator=gen) * torch.logspace(-4, 4, 6).unsqueeze(1)
        g = torch.randn(k, generator=gen)
        q, s = kernels.quantize_rows(x, g, 1e-6)
        q_ref, s_ref = quantize_activations(rmsnorm(x, g, 1e-6))
        assert q.dtype == torch.int8 and s.shape == (6, 1)
        moved = (q.int() - q_ref.int()).abs()
        assert int(moved.max()) <= 1 and float((moved > 0).float().mean()) <= 0.01, f"K={k}"
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)


def test_bitlinear_zero_rows_and_half_precision_input() -> None:
    x, g, weight = bitlinear_case((4, 200), 12, seed=5)
    x[1] = 0.0  # max|y| = 0: the scale floor 1e-5 must keep everything finite
    for inp in (x, x.to(torch.bfloat16)):
        got = kernels.bitlinear(inp, g, 1e-6, weight)
        want = bitlinear_reference(inp, g, 1e-6, weight)
        assert torch.isfinite(got).all() and torch.equal(got[1], torch.zeros(12))
        assert_close(got, want, BITLINEAR_REL)


def test_reference_backend_is_the_reference() -> None:
    x, g, weight = bitlinear_case((3, 130), 7, seed=2)
    assert torch.equal(kernels.bitlinear(x, g, 1e-6, weight, backend="reference"),
                       bitlinear_reference(x, g, 1e-6, weight))
    q, t = random_case(2, 7, 130, seed=2)
    w = TernaryMatrix.from_ternary(t, 1.0)
    assert torch.equal(kernels.ternary_matmul(q, w, backend="reference"), ternary_matmul_reference(q, t))


def test_works_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "HAVE_C", False)
    monkeypatch.setattr(kernels, "_c", None)
    assert kernels.isa_paths() == ["scalar"]
    x, g, weight = bitlinear_case((2, 100), 9, seed=4)
    assert torch.equal(kernels.bitlinear(x, g, 1e-6, weight), bitlinear_reference(x, g, 1e-6, weight))
    q, t = random_case(3, 9, 100, seed=4)
    w = TernaryMatrix.from_ternary(t, 1.0)
    assert torch.equal(kernels.ternary_matmul(q, w), ternary_matmul_reference(q, t))
    with pytest.raises(UnsupportedError, match="C extension"):
        kernels.bitlinear(x, g, 1e-6, weight, backend="c")
    assert kernels.read_bandwidth_bytes_per_s.__doc__  # the public function stays importable


def test_package_imports_when_the_extension_is_missing() -> None:
    # A fresh interpreter in which importing the .so fails, as after an install without compiler.
    code = textwrap.dedent("""
        import sys, torch
        sys.modules["memwise.kernels._ternary"] = None
        from memwise import kernels
        from memwise.kernels.packed import TernaryMatrix, ternary_matmul_reference
        assert not kernels.HAVE_C and kernels.isa_paths() == ["scalar"]
        t = torch.randint(-1, 2, (5, 40), dtype=torch.int8)
        q = torch.randint(-128, 128, (2, 40), dtype=torch.int8)
        assert torch.equal(kernels.ternary_matmul(q, TernaryMatrix.from_ternary(t, 1.0)),
                           ternary_matmul_reference(q, t))
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MEMWISE_ISA", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.fixture
def small() -> tuple[torch.Tensor, TernaryMatrix]:
    q, t = random_case(2, 6, 200, seed=9)
    return q, TernaryMatrix.from_ternary(t, 1.0)


def test_bad_activation_inputs(small) -> None:
    q, w = small
    with pytest.raises(kernels.KernelInputError, match="int8"):
        kernels.ternary_matmul(q.float(), w)
    with pytest.raises(kernels.KernelInputError, match="2-d"):
        kernels.ternary_matmul(q.unsqueeze(0), w)
    with pytest.raises(kernels.KernelInputError, match="K=199 .*expects 200"):
        kernels.ternary_matmul(q[:, :199], w)
    with pytest.raises(kernels.KernelInputError, match="unknown isa 'sse9'"):
        kernels.ternary_matmul(q, w, isa="sse9")
    with pytest.raises(kernels.KernelInputError, match="unknown backend 'gpu'"):
        kernels.ternary_matmul(q, w, backend="gpu")


def test_bad_weight_inputs(small) -> None:
    q, w = small
    wrong_dtype = TernaryMatrix(w.packed.to(torch.int8), w.scale, w.rows, w.cols)
    with pytest.raises(kernels.KernelInputError, match="uint8"):
        kernels.ternary_matmul(q, wrong_dtype)
    wrong_shape = TernaryMatrix(w.packed[:, :32], w.scale, w.rows, w.cols)
    with pytest.raises(kernels.KernelInputError, match=r"shape \[6, 64\], got \[6, 32\]"):
        kernels.ternary_matmul(q, wrong_shape)
    wide = pack_ternary(torch.zeros(12, 200, dtype=torch.int8))
    strided = TernaryMatrix(wide[::2], w.scale, 6, 200)
    with pytest.raises(kernels.KernelInputError, match="contiguous"):
        kernels.ternary_matmul(q, strided)
    with pytest.raises(kernels.KernelInputError, match="TernaryMatrix"):
        kernels.ternary_matmul(q, w.packed)


def test_bad_bitlinear_inputs(small) -> None:
    _, w = small
    x = torch.randn(3, 200)
    with pytest.raises(kernels.KernelInputError, match="last dimension 100, .*K=200"):
        kernels.bitlinear(x[:, :100], torch.ones(200), 1e-6, w)
    with pytest.raises(kernels.KernelInputError, match=r"shape \[200\], got \[199\]"):
        kernels.bitlinear(x, torch.ones(199), 1e-6, w)
    with pytest.raises(kernels.KernelInputError, match="floating-point"):
        kernels.bitlinear(x.to(torch.int32), torch.ones(200), 1e-6, w)


# ---------------------------------------------------------------------------------------------
# Bandwidth and benchmark


@pytest.mark.skipif(not kernels.HAVE_C, reason="C extension not built")
def test_read_bandwidth_measures_something() -> None:
    bw = kernels._c.read_bandwidth(32 << 20, 2, 1)
    assert math.isfinite(bw) and bw > 1e8  # any real machine reads well over 100 MB/s


def test_kernel_bench_records(monkeypatch: pytest.MonkeyPatch) -> None:
    from memwise.kernels import bandwidth
    monkeypatch.setattr(bandwidth, "_bandwidth", 10e9)  # skip the 1-second DRAM measurement
    isa = [p for p in kernels.isa_paths() if p != "amx"][0]  # AMX sits out M below AMX_MIN_ROWS
    records = bench.run_kernel_bench(sizes=("370m",), batch_sizes=(1, 3), repeats=2, isas=[isa],
                                     arena_bytes=1 << 20)
    assert [(r["matrix"], r["rows"], r["cols"]) for r in records[::2]] == [
        ("attn.i_proj/f_proj/g_proj/o_proj", 1024, 1024), ("mlp.gate_proj", 5632, 1024),
        ("mlp.down_proj", 1024, 2816), ("lm_head", 32000, 1024)]
    assert [r["batch"] for r in records] == [1, 3] * 4
    for r in records:
        assert r["weight_bytes"] == r["rows"] * (-(-r["cols"] // 128) * 32)
        assert r["seconds"] >= r["best_seconds"] > 0
        assert r["gbps"] == pytest.approx(r["weight_bytes"] / r["seconds"] / 1e9)
        assert r["pct_of_bandwidth"] == pytest.approx(r["gbps"] * 10)
    table = bench.format_kernel_bench(records)
    assert "10.0 GB/s" in table and table.count("| 370m |") == len(records)
    with pytest.raises(MemwiseError, match="unknown model size '7b'"):
        bench.run_kernel_bench(sizes=("7b",))


# ---------------------------------------------------------------------------------------------
# Triton (optional; runs in the interpreter on CPU tensors when triton is installed)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_in_interpreter() -> None:
    code = textwrap.dedent("""
        import torch
        from memwise import kernels
        from memwise.kernels.packed import TernaryMatrix, bitlinear_reference, ternary_matmul_reference
        gen = torch.Generator().manual_seed(0)
        for m, n, k in [(1, 5, 7), (17, 70, 300), (3, 64, 256)]:
            t = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
            q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
            q[0, :3] = -128
            w = TernaryMatrix.from_ternary(t, 0.3)
            assert torch.equal(kernels.ternary_matmul(q, w, backend="triton"),
                               ternary_matmul_reference(q, t))
            x, g = torch.randn(m, k, generator=gen), torch.rand(k, generator=gen)
            assert torch.equal(kernels.bitlinear(x, g, 1e-6, w, backend="triton"),
                               bitlinear_reference(x, g, 1e-6, w))
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def _greedy_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(41)
    cases = [torch.randn(shape, generator=g) for shape in [(1, 32000), (16, 32000), (3, 7), (5, 4097),
                                                           (2, 50001), (4, 1), (0, 10)]]
    x = torch.randn(9, 40000, generator=g)
    x[0, 30000] = x[0, 35000] = float("nan")       # first NaN wins, in the second half
    x[1, 100] = float("nan")                       # NaN in the first half
    x[2] = float("-inf")                           # all equal: index 0
    x[3, 5] = x[3, 39999] = 1e9                    # a tie across the threads' halves: the first
    x[4, 39999] = float("nan")                     # NaN in the scalar tail
    x[5] = 1.0
    x[6, 20000] = x[6, 19999] = 50.0               # a tie at the halves' boundary
    x[7, 17] = float("inf")
    x[8, :16] = float("nan")                       # NaN in the very first lanes
    cases.append(x)
    return cases


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_greedy_tokens_match_torch_max(threads: int) -> None:
    # Greedy decoding's choice: the first largest logit of each row, or the first NaN, exactly as
    # torch's max(dim=-1).indices, whatever the threads and where they split the row.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x in _greedy_cases():
            got = kernels.greedy_tokens(x)
            assert got.dtype == torch.long
            assert torch.equal(got, x.max(dim=-1).indices), list(x.shape)
    finally:
        torch.set_num_threads(previous)


def test_greedy_tokens_other_inputs_use_torch() -> None:
    # Not a contiguous float32 CPU matrix: torch's own reduction, same answer.
    x = torch.randn(8, 300)
    for y in (x.t(), x.double(), x[:, ::2]):
        assert torch.equal(kernels.greedy_tokens(y), y.max(dim=-1).indices)
