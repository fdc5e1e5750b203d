"""The quantized KV cache (kv_cache="int8" | "int4"): its layout against the scheme's error bound, the
cache's size against its formula, and generation with it against the float cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import memwise
from memwise.errors import MemwiseError
from memwise.bench.cell import CellSpec, run_cell
from memwise.bench.sources import resolve
from memwise.estimate.inference import estimate_inference, spec_cache_bytes
from memwise.kernels import kv_quant
from memwise.models.decoder.cache import DecoderCache, QuantizedDecoderCache

SCHEMES = ["int8", "int4"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("head_dim", [64, 128, 80, 32, 6])
def test_round_trip_within_the_error_bound(scheme, head_dim):
    x = torch.randn(2, 3, 17, head_dim, generator=torch.Generator().manual_seed(head_dim)) * 3
    x[0, 0, 0] = 0.0                # an all-zero vector: exact
    x[0, 0, 1] = 1.5                # a constant vector: exact
    codes, params = kv_quant.quantize_kv(x, scheme)
    assert codes.shape[-1] == kv_quant.codes_width(scheme, head_dim)
    assert params.shape[-2:] == (head_dim // kv_quant.group_size(head_dim), kv_quant.params_width(scheme))
    back = kv_quant.dequantize_kv(codes, params, scheme)
    error = (back - x).abs()
    # half a step, plus float32 rounding of the (x - lo) / scale and code * scale + lo computations
    assert bool((error <= kv_quant.error_bound(x, scheme) * (1 + 1e-5) + 1e-6 * x.abs().amax()).all())
    assert torch.equal(back[0, 0, :2], x[0, 0, :2])
    # the steps are what the scheme says: 255 (int8) or 16 (int4) levels per group
    levels = 255 if scheme == "int8" else 16
    assert float(error.max()) > 0 and float(error.max()) <= float(x.abs().max()) * 2 / (levels - 1)


def test_layout_bytes_and_packing():
    assert kv_quant.group_size(64) == 64 and kv_quant.group_size(128) == 64
    assert kv_quant.group_size(80) == 40 and kv_quant.group_size(32) == 32
    assert kv_quant.bytes_per_vector("int8", 64) == 64 + 4
    assert kv_quant.bytes_per_vector("int4", 64) == 32 + 8
    x = torch.tensor([[0.0, 15.0, 1.0, 14.0]])
    codes, params = kv_quant.quantize_kv(x, "int4")
    # element 2j in the low nibble, 2j + 1 in the high one; lo = 0, scale = 1
    assert codes.tolist() == [[0xF0, 0xE1]] and params.tolist() == [[[1.0, 0.0]]]


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cache_allocates_what_it_reports(preset, scheme):
    model = memwise.load(f"preset:{preset}", kv_cache=scheme)
    cache = model.module.new_cache(3, 40)
    assert isinstance(cache, QuantizedDecoderCache)
    tensors = [*cache.codes, *cache.params, cache.workspace] + ([cache.scratch] if scheme == "int4" else [])
    held = sum(t.numel() * t.element_size() for t in tensors) + cache.mask.numel() + cache.real_count.numel() * 8
    assert held == model.module.cache_bytes(3, 40) == spec_cache_bytes(model.spec, 3, 40, torch.float32, scheme)
    plain = memwise.load(f"preset:{preset}").module
    assert isinstance(plain.new_cache(3, 40), DecoderCache)
    # per layer: keys and values of 3 x 40 slots, quantized; plus one layer in float32 (and int4's unpacked codes)
    spec = model.spec
    vectors = 2 * 3 * spec.num_kv_heads * 40
    layer_float = vectors * spec.head_dim * 4
    assert model.module.cache_bytes(3, 40) == (3 * 48 + spec.num_layers * vectors * kv_quant.bytes_per_vector(
        scheme, spec.head_dim) + layer_float + (vectors * spec.head_dim if scheme == "int4" else 0))
    assert plain.cache_bytes(3, 40) == 3 * 48 + spec.num_layers * layer_float


def prompts() -> torch.Tensor:
    return torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-bitnet"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_close_to_the_float_cache(preset, scheme):
    """Keys and values move by at most half a group step: ~0.4% of a group's absmax (int8), ~3% of its
    range (int4); through two layers that stays a small part of the logits' spread."""
    ids = prompts()
    reference = memwise.load(f"preset:{preset}").logits(ids)
    logits = memwise.load(f"preset:{preset}", kv_cache=scheme).logits(ids)
    error = float((logits - reference).abs().max() / reference.std())
    assert 0 < error < (0.05 if scheme == "int8" else 0.4)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-bitnet"])
def test_greedy_tokens_match_the_float_cache_int8(preset):
    ids = prompts()
    reference = memwise.load(f"preset:{preset}").generate(ids, 12)
    assert torch.equal(memwise.load(f"preset:{preset}", kv_cache="int8").generate(ids, 12), reference)
    # one sequence: the decode steps bitnet fuses in C with a float cache run its modules with a quantized one
    reference = memwise.load(f"preset:{preset}").generate(ids[:1], 12)
    assert torch.equal(memwise.load(f"preset:{preset}", kv_cache="int8").generate(ids[:1], 12), reference)


def test_greedy_tokens_match_the_float_cache_int4_short_run():
    ids = prompts()
    reference = memwise.load("preset:tiny-llama").generate(ids, 6)
    assert torch.equal(memwise.load("preset:tiny-llama", kv_cache="int4").generate(ids, 6), reference)


def test_padded_batch_gives_each_prompt_its_own_tokens():
    model = memwise.load("preset:tiny-llama", kv_cache="int8")
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    batch = model.generate(rows, 5)
    for i, row in enumerate(rows):
        alone = model.generate([row], 5)
        assert batch[i, -5:].tolist() == alone[0, -5:].tolist()


def test_bad_kv_schemes_are_one_clear_line():
    with pytest.raises(MemwiseError, match=r"^unknown KV cache scheme 'int3' \(known: int8, int4\)$"):
        memwise.load("preset:tiny-gpt2", kv_cache="int3")
    with pytest.raises(MemwiseError, match="hgrn_bit models have no KV cache .*fixed size"):
        memwise.load("preset:tiny-mmfree", kv_cache="int8")


def run_cli(*args):
    # wide, so that rich does not wrap table cells
    return subprocess.run([sys.executable, "-m", "memwise.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_generate_with_a_kv_cache_scheme():
    run = run_cli("generate", "preset:tiny-llama", "--prompt", "hi", "--max-new-tokens", "4", "--ignore-eos",
                  "--kv-cache", "int4", "--threads", "1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("[4 tokens | TTFT")
    for source, scheme, expected in (("preset:tiny-gpt2", "int2", "unknown KV cache scheme 'int2'"),
                                     ("preset:tiny-mmfree", "int8", "hgrn_bit models have no KV cache")):
        run = run_cli("generate", source, "--prompt", "hi", "--kv-cache", scheme)
        assert run.returncode == 1 and run.stderr.strip().count("\n") == 0 and expected in run.stderr


def test_estimate_counts_the_quantized_cache():
    plain = estimate_inference("preset:gpt2-medium", prompt_tokens=512, new_tokens=512)
    for scheme, per_vector in (("int8", 64 + 4), ("int4", 32 + 8)):
        quantized = estimate_inference("preset:gpt2-medium", prompt_tokens=512, new_tokens=512, kv_cache=scheme)
        # gpt2-medium: 24 layers x 16 heads x head_dim 64, keys and values, 1024 slots
        workspace = 2 * 16 * 1024 * 64 * (4 if scheme == "int8" else 5)     # one layer float32 (+ int4's unpacked codes)
        assert quantized.parts["kv_cache"] == 24 * 2 * 16 * 1024 * per_vector + workspace + 1024 + 8
        assert quantized.settings["kv_cache"] == scheme
        assert plain.predicted_peak_bytes - quantized.predicted_peak_bytes == \
            plain.parts["kv_cache"] - quantized.parts["kv_cache"]
    run = run_cli("estimate", "preset:gpt2-medium", "--kv-cache", "int4", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["breakdown"]["kv_cache"] == 24 * 2 * 16 * 256 * 40 + 2 * 16 * 256 * 64 * 5 + 256 + 8
    with pytest.raises(MemwiseError, match="no KV cache"):
        estimate_inference("preset:tiny-mmfree", kv_cache="int8")


def test_bench_records_the_kv_cache_scheme():
    source = resolve("preset:tiny-gpt2")
    spec = CellSpec(model="tiny-gpt2", engine="memwise", kv_cache="int8", prompt_tokens=8, new_tokens=3, runs=1,
                    warmup=0, threads=1, source=dict(name="tiny-gpt2", source="preset:tiny-gpt2", kind="preset",
                                                      weights="synthetic", config=source.config))
    record = run_cell(spec)
    assert record["status"] == "ok", record["reason"]
    assert record["kv_cache"] == "int8" and record["quantize"] is None


def test_info_lists_kv_cache_bytes_per_token():
    run = run_cli("info", "preset:gpt2-medium")
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    # 24 layers x 2 (keys, values) x 16 heads x 64 numbers: 192 KiB at 4 bytes, (64 + 4) and (32 + 8) bytes per vector
    for expected in ("KV cache per token, float32 │ 192.00 KiB", "kv_cache=int8 │ 51.00 KiB (1.062 B/number)",
                     "kv_cache=int4 │ 30.00 KiB (0.625 B/number)"):
        assert expected in text, expected
    assert "KV cache" not in memwise_info_text("preset:tiny-mmfree")


def memwise_info_text(source: str) -> str:
    return " ".join(run_cli("info", source).stdout.split())
