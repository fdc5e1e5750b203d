"""HGRN-Bit (MatMul-free) models: logits against a plain float32 implementation of the spec written
here from the latent weights, caches and padding, backends, synthetic presets, and loading errors."""
import json
import math
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import memwise
from memwise.checkpoint import CheckpointReader
from memwise.errors import CheckpointError, ConfigError, UnsupportedError
from memwise.models import hgrn_bit
from memwise.models.ternary import weights as hgrn_weights
from memwise.presets import preset_config
from memwise.kernels.packed import HUGE_PAGE, codes_buffer, pack_ternary, quantize_latent

from hgrn_checkpoints import hgrn_config, write_hgrn_checkpoint

EPS = 1e-6


# ---- the spec, in plain float32 PyTorch -------------------------------------------------------

def ref_rmsnorm(x, gain, eps=EPS):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def ref_bitlinear(x, gain, latent):
    y = ref_rmsnorm(x, gain)
    s = 127.0 / y.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    q = (y * s).round().clamp(-128, 127)
    w = latent.float()
    m = w.abs().mean().clamp(min=1e-5)
    t = (w / m).round().clamp(-1, 1)
    return (q @ t.T) * (m / s)


def reference_logits(w, config, ids, mask=None, paper_gate=False):
    """Logits [B, T, V] of the whole sequence, following the HGRN-Bit notes step by step.

    paper_gate=True draws the output gate as the paper does (norm on the state, sigmoid on g), which
    the released checkpoints do not use; it exists to show the comparison can tell the two apart."""
    w = {k: v.float() for k, v in w.items()}
    n_layers, heads = config["num_hidden_layers"], config.get("num_heads", 1)

    def bl(x, prefix):
        return ref_bitlinear(x, w[f"{prefix}.norm.weight"], w[f"{prefix}.weight"])

    if config.get("use_lower_bound", True):
        lb = w["model.lower_bounds"].softmax(0)
        lower = lb.cumsum(0) - lb[0]
    x = w["model.embeddings.weight"][ids]
    for n in range(n_layers):
        p = f"model.layers.{n}"
        h = ref_rmsnorm(x, w[f"{p}.attn_norm.weight"])
        i, f, g = bl(h, f"{p}.attn.i_proj"), bl(h, f"{p}.attn.f_proj"), bl(h, f"{p}.attn.g_proj")
        f = torch.sigmoid(f)
        if config.get("use_lower_bound", True) and n > 0:
            f = lower[n] + (1 - lower[n]) * f
        c = torch.nn.functional.silu(i) * (1 - f)
        if mask is not None:
            c = c * mask[..., None]
        state = torch.zeros(ids.shape[0], c.shape[-1])
        states = []
        for t in range(ids.shape[1]):
            state = f[:, t] * state + c[:, t]
            states.append(state)
        states = torch.stack(states, 1)
        gh = g.view(*g.shape[:-1], heads, -1)
        if paper_gate:
            sh = states.view(*g.shape[:-1], heads, -1)
            o = ref_rmsnorm(sh, w[f"{p}.attn.g_norm.weight"]).view(g.shape) * torch.sigmoid(g)
        else:
            o = ref_rmsnorm(gh, w[f"{p}.attn.g_norm.weight"]).view(g.shape) * torch.nn.functional.silu(states)
        x = x + bl(o, f"{p}.attn.o_proj")
        h = ref_rmsnorm(x, w[f"{p}.mlp_norm.weight"])
        y = bl(h, f"{p}.mlp.gate_proj")
        size = y.shape[-1] // 2
        x = x + bl(torch.nn.functional.silu(y[..., :size]) * y[..., size:], f"{p}.mlp.down_proj")
    x = ref_rmsnorm(x, w["model.norm.weight"])
    return bl(x, "lm_head")


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


CONFIGS = {
    "h64": hgrn_config(64, 3, 301),
    # H not a multiple of 128 (padded rows), an explicit odd intermediate size, more layers.
    "h96-odd": hgrn_config(96, 4, 257, intermediate_size=200),
    "heads2": hgrn_config(64, 2, 128, num_heads=2),
    "expand2": hgrn_config(64, 2, 128, expand_ratio=2, use_lower_bound=False),
    # Codes over 2 MB (the lm_head alone takes 2.56 MB): on Linux they live in memory advised for
    # huge pages (memwise.kernels.packed.codes_buffer), not in a torch allocation.
    "huge-pages": hgrn_config(256, 1, 40000),
}


def load_dir(path, backend="reference"):
    model = memwise.load(str(path))
    model.module.backend = backend
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    config = CONFIGS[request.param]
    return path, config, write_hgrn_checkpoint(path, config, seed=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    config = hgrn_config(64, 3, 301)
    return path, config, write_hgrn_checkpoint(path, config, seed=2)


# ---- numerics ----------------------------------------------------------------------------------

def test_logits_match_reference_implementation(checkpoint):
    path, config, tensors = checkpoint
    ids = torch.randint(0, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    got = load_dir(path).logits(ids)
    want = reference_logits(tensors, config, ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    diff = rel_diff(got, want)
    print(f"largest relative difference: {diff:.2e}")
    assert diff < 1e-4


def test_output_gate_form_matters(small):
    """The comparison above is sharp enough to catch the paper's gate form (norm on the state)."""
    path, config, tensors = small
    ids = torch.arange(1, 9)[None]
    got = load_dir(path).logits(ids)
    assert rel_diff(got, reference_logits(tensors, config, ids)) < 1e-4
    assert rel_diff(got, reference_logits(tensors, config, ids, paper_gate=True)) > 1e-2


def test_loaded_codes_are_the_latent_quantized_once(small):
    path, config, tensors = small
    module = load_dir(path).module
    for name, layer in module.ternary_layers():
        t, m = quantize_latent(tensors[name])
        assert torch.equal(layer.packed, pack_ternary(t)), name
        assert math.isclose(layer.scale, m, rel_tol=1e-6), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5), (7, 128), (5, 200), (1, 1), (600, 300)])
@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_ternarize_matches_whole_matrix_quantization(shape, chunk, dtype, monkeypatch):
    monkeypatch.setattr(hgrn_weights, "CHUNK_ELEMENTS", chunk)    # many row chunks, or one
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.02).to(dtype)
    before = w.clone()
    t, m = quantize_latent(w)
    got = hgrn_bit.ternarize(w)
    assert torch.equal(w, before)       # a float32 matrix is not quantized in place
    assert (got.rows, got.cols) == shape
    assert torch.equal(got.ternary(), t)
    assert math.isclose(got.scale, m, rel_tol=1e-6)


def test_prefill_then_decode_equals_full_forward(small):
    path, config, _ = small
    module = load_dir(path).module
    ids = torch.randint(0, config["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = module(ids)
        cache = module.new_cache(2, 10)
        steps = [module(ids[:, :6], cache, last_only=True)]
        for t in range(6, 10):
            steps.append(module(ids[:, t:t + 1], cache, torch.ones(2, 1, dtype=torch.bool)))
    assert cache.length == 10
    assert torch.allclose(torch.cat(steps, 1), full[:, 5:], rtol=0, atol=1e-5 * float(full.abs().max()))


@pytest.mark.parametrize("backend", ["reference", "c"])
def test_long_forward_in_slices_equals_one_pass(checkpoint, backend, monkeypatch):
    """A CPU forward over more tokens than `slice_tokens` runs in slices (prefill memory churn,
    HGRNBitForCausalLM._forward_slices): same logits, same state, with a left-padded mask."""
    from memwise import kernels
    if backend == "c" and not getattr(kernels, "HAVE_C", False):
        pytest.skip("the C kernels are not built")
    path, config, _ = checkpoint
    module = load_dir(path, backend).module
    ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :4] = False
    passes = []   # positions per call of the layer stack
    real_layers = type(module)._layers

    def counted_layers(self, input_ids, *rest):
        passes.append(input_ids.shape[1])
        return real_layers(self, input_ids, *rest)

    monkeypatch.setattr(type(module), "_layers", counted_layers)
    results = {}
    for slice_tokens in (10**9, 6):   # 6 tokens over a batch of 2: slices of 3 positions
        module.slice_tokens = slice_tokens
        passes.clear()
        with torch.inference_mode():
            cache = module.new_cache(2)
            full = module(ids, cache, mask)
            last_cache = module.new_cache(2)
            last = module(ids, last_cache, mask, last_only=True)
        results[slice_tokens] = (full, cache.state.clone(), cache.length, last, last_cache.state.clone(), list(passes))
    (full1, state1, len1, last1, lstate1, passes1), (full3, state3, len3, last3, lstate3, passes3) = results.values()
    assert passes1 == [11, 11] and passes3 == [3, 3, 3, 2] * 2
    assert len1 == len3 == 11
    assert torch.equal(full3, full1) and torch.equal(state3, state1)
    assert torch.equal(last3, last1) and torch.equal(lstate3, lstate1) and torch.equal(last1, full1[:, -1:])


def test_state_is_constant_in_sequence_length(small):
    path, config, _ = small
    module = load_dir(path).module
    cache = module.new_cache(3, 100000)
    assert cache.state.shape == (config["num_hidden_layers"], 3, config["hidden_size"])
    before = cache.state.nbytes
    with torch.inference_mode():
        module(torch.ones(3, 20, dtype=torch.long), cache)
    assert cache.state.nbytes == before == config["num_hidden_layers"] * 3 * config["hidden_size"] * 4


def test_left_padded_batch_equals_prompts_alone(small):
    path, config, _ = small
    model = load_dir(path)
    prompts = [[5, 17, 42, 9, 88, 3, 61], [200, 7, 19], [11, 12, 13, 14, 15]]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        ids[b, :width - len(p)] = 2      # padding with a real token id: only the mask may hide it
        mask[b, width - len(p):] = True
    batch_logits = model.logits(ids, mask)
    batch_out = model.generate(ids, 5, mask, ignore_eos=True)
    for b, p in enumerate(prompts):
        alone = model.logits(torch.tensor([p]))
        assert torch.allclose(batch_logits[b, width - len(p):], alone[0], rtol=0, atol=1e-5 * float(alone.abs().max()))
        alone_out = model.generate(torch.tensor([p]), 5, ignore_eos=True)
        assert batch_out[b, width:].tolist() == alone_out[0, len(p):].tolist()


def test_padding_mask_changes_the_result(small):
    """The masked positions really are excluded: without the mask the padded row differs."""
    path, _, _ = small
    model = load_dir(path)
    ids = torch.tensor([[2, 2, 5, 6, 7]])
    masked = model.logits(ids, torch.tensor([[False, False, True, True, True]]))
    unmasked = model.logits(ids)
    alone = model.logits(torch.tensor([[5, 6, 7]]))
    assert torch.allclose(masked[0, 2:], alone[0], atol=1e-5 * float(alone.abs().max()), rtol=0)
    assert not torch.allclose(unmasked[0, 2:], alone[0], atol=1e-3, rtol=0)


def test_backends_agree(checkpoint):
    from memwise import kernels
    if not getattr(kernels, "HAVE_C", False):
        pytest.skip("the C kernels are not built")
    path, config, _ = checkpoint
    model = load_dir(path)
    ids = torch.randint(0, config["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(4))
    ref = model.logits(ids)
    model.module.backend = "c"
    got = model.logits(ids)
    # Integer products are exact in both; only float rounding of the norm and rescale may differ.
    assert rel_diff(got, ref) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(checkpoint):
    # On a GPU the products run in Triton (when installed) and the rest in torch: logits close to
    # the CPU reference, and the same greedy tokens.
    path, config, _ = checkpoint
    cpu = load_dir(path)
    gpu = memwise.load(str(path), device="cuda")
    ids = torch.randint(0, config["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(5))
    assert rel_diff(gpu.logits(ids).cpu(), cpu.logits(ids)) < 1e-4
    assert torch.equal(gpu.generate(ids, 12, ignore_eos=True).cpu(), cpu.generate(ids, 12, ignore_eos=True))


def test_unknown_backend_is_refused(small):
    model = load_dir(small[0], backend="cuda-magic")
    with pytest.raises(UnsupportedError, match="cuda-magic"):
        model.logits(torch.tensor([[1, 2]]))


def test_tied_checkpoint_without_lm_head_uses_embedding(tmp_path):
    config = hgrn_config(64, 2, 150, tie_word_embeddings=True)
    tensors = write_hgrn_checkpoint(tmp_path, config, drop=("lm_head.weight",))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = reference_logits({**tensors, "lm_head.weight": tensors["model.embeddings.weight"]}, config, ids)
    assert rel_diff(load_dir(tmp_path).logits(ids), want) < 1e-4


# ---- what the model holds ----------------------------------------------------------------------

def test_model_holds_packed_codes_and_bf16_embedding_only(small):
    path, config, tensors = small
    module = load_dir(path).module
    assert module.embeddings.dtype == torch.bfloat16
    assert torch.equal(module.embeddings, tensors["model.embeddings.weight"])
    for name, buf in module.named_buffers():
        if buf.dim() == 2 and name != "embeddings" and name != "lower_bounds":
            assert buf.dtype == torch.uint8, name
    spec = module.spec
    assert module.weights_bytes() == hgrn_bit.weight_sizes(spec)["packed 2-bit"]


def thp_mapping(address: int) -> bool:
    """Whether the mapping of this process that holds `address` is advised for transparent huge
    pages (VmFlags hg) and, unless THP is off on this system, eligible for them (a shared
    mapping is advised but not eligible)."""
    with open("/proc/self/smaps") as f:
        text = f.read()
    for entry in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) [^\n]*\n((?:[A-Za-z_]+:[^\n]*\n)+)", text, re.M):
        if int(entry.group(1), 16) <= address < int(entry.group(2), 16):
            fields = entry.group(3)
            flags = re.search(r"^VmFlags:(.*)$", fields, re.M)
            advised = flags is not None and "hg" in flags.group(1).split()
            try:
                with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                    thp_off = "[never]" in f.read()
            except OSError:
                thp_off = True
            eligible = thp_off or re.search(r"^THPeligible:\s*1", fields, re.M) is not None
            return advised and eligible
    raise AssertionError(f"no mapping holds address {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page advice is Linux only")
def test_codes_buffer_is_aligned_and_advised_for_huge_pages():
    n = 3 * HUGE_PAGE + 5
    buf = codes_buffer(n)
    assert buf.dtype == torch.uint8 and buf.numel() == n and buf.data_ptr() % HUGE_PAGE == 0
    buf.fill_(3)
    assert int(buf.sum()) == 3 * n
    assert thp_mapping(buf.data_ptr())
    assert codes_buffer(1000).numel() == 1000  # small buffers: a plain tensor


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page advice is Linux only")
def test_codes_buffer_without_huge_pages_on_request(monkeypatch):
    monkeypatch.setenv("MEMWISE_HUGE_PAGES", "0")
    buf = codes_buffer(3 * HUGE_PAGE + 5)
    assert buf.numel() == 3 * HUGE_PAGE + 5 and not thp_mapping(buf.data_ptr())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page advice is Linux only")
def test_large_models_keep_codes_in_huge_page_memory(tmp_path):
    write_hgrn_checkpoint(tmp_path, CONFIGS["huge-pages"], seed=3)
    module = load_dir(tmp_path).module
    first = min(layer.packed.data_ptr() for _, layer in module.ternary_layers())
    assert first % HUGE_PAGE == 0 and thp_mapping(first)


def test_released_sizes_from_config_rules():
    want = {"mmfree-370m": (2816, 374_108_160), "mmfree-1.3b": (5632, 1_364_779_008),
            "mmfree-2.7b": (6912, 2_702_357_504)}
    for name, (inter, params) in want.items():
        spec = hgrn_bit.spec_from_config(preset_config(name), name)
        assert spec.intermediate_size == inter
        assert hgrn_bit.parameter_count(spec) == params
        sizes = hgrn_bit.weight_sizes(spec)
        assert sizes["bfloat16"] == 2 * params
    sizes = hgrn_bit.weight_sizes(hgrn_bit.spec_from_config(preset_config("mmfree-2.7b"), "p"))
    assert 0.75e9 < sizes["packed 2-bit"] < 0.85e9


def test_spec_defaults():
    spec = hgrn_bit.spec_from_config({"model_type": "hgrn_bit"}, "config.json")
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.intermediate_size) == (32000, 2048, 24, 5632)
    assert (spec.norm_eps, spec.use_lower_bound, spec.expand_ratio, spec.num_heads) == (1e-6, True, 1, 1)
    assert (spec.bos_token_id, spec.eos_token_ids, spec.tie_word_embeddings) == (1, (2,), False)
    assert hgrn_bit.spec_from_config({"hidden_size": 96, "hidden_ratio": 3}, "c").intermediate_size == 256 * 1


def test_synthetic_preset_is_packed_and_deterministic():
    spec = hgrn_bit.spec_from_config(preset_config("tiny-mmfree"), "tiny")
    a = hgrn_bit.synthetic(spec, torch.float32, "cpu", seed=5)
    b = hgrn_bit.synthetic(spec, torch.float32, "cpu", seed=5)
    c = hgrn_bit.synthetic(spec, torch.float32, "cpu", seed=6)
    assert a.weights_bytes() == hgrn_bit.weight_sizes(spec)["packed 2-bit"]
    assert torch.equal(a.lm_head.packed, b.lm_head.packed) and not torch.equal(a.lm_head.packed, c.lm_head.packed)
    t = a.lm_head.weight.ternary()
    share = [(t == v).float().mean().item() for v in (-1, 0, 1)]
    assert all(abs(x - y) < 0.05 for x, y in zip(share, (0.25, 0.5, 0.25)))
    assert 0.015 < a.lm_head.scale < 0.03
    logits = a(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_synthetic_codes_have_zero_padding():
    spec = hgrn_bit.spec_from_config(hgrn_config(96, 1, 50, intermediate_size=200), "odd")
    model = hgrn_bit.synthetic(spec, torch.float32, "cpu", seed=0)
    for name, layer in model.ternary_layers():
        hgrn_bit.check_packed_codes(layer.packed, layer.cols, name, "synthetic")
        codes = layer.weight.ternary()
        assert set(codes.unique().tolist()) <= {-1, 0, 1}


def test_public_api_preset():
    model = memwise.load("preset:tiny-mmfree")
    out = model.generate(torch.tensor([[1, 2, 3]]), 4, ignore_eos=True)
    assert out.shape == (1, 7) and model.synthetic


# ---- errors ------------------------------------------------------------------------------------

def rewrite_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_short_conv_is_refused(tmp_path):
    write_hgrn_checkpoint(tmp_path, hgrn_config(64, 1, 50, use_short_conv=True))
    with pytest.raises(UnsupportedError, match="use_short_conv"):
        memwise.load(str(tmp_path))


def test_other_attn_mode_is_refused(tmp_path):
    write_hgrn_checkpoint(tmp_path, hgrn_config(64, 1, 50, attn_mode="chunk"))
    with pytest.raises(UnsupportedError, match="attn_mode 'chunk'"):
        memwise.load(str(tmp_path))


def test_num_heads_not_matching_tensors(tmp_path):
    write_hgrn_checkpoint(tmp_path, hgrn_config(64, 1, 50))
    rewrite_config(tmp_path, num_heads=4)
    with pytest.raises(ConfigError, match=r"num_heads 4 .*g_norm.*\[64\].*num_heads 1 would fit"):
        memwise.load(str(tmp_path))


def test_num_heads_not_dividing_width(tmp_path):
    write_hgrn_checkpoint(tmp_path, hgrn_config(64, 1, 50))
    rewrite_config(tmp_path, num_heads=3)
    with pytest.raises(ConfigError, match="num_heads 3 does not divide"):
        memwise.load(str(tmp_path))


def test_expand_ratio_not_matching_tensors(tmp_path):
    write_hgrn_checkpoint(tmp_path, hgrn_config(64, 1, 50, expand_ratio=2, use_lower_bound=False))
    rewrite_config(tmp_path, expand_ratio=1)
    with pytest.raises(ConfigError, match=r"expand_ratio 1 .*i_proj.weight' has 128 rows .*expand_ratio 2 would fit"):
        memwise.load(str(tmp_path))


def test_expand_ratio_with_lower_bounds_is_refused(tmp_path):
    write_hgrn_checkpoint(tmp_path, hgrn_config(64, 1, 50, expand_ratio=2, use_lower_bound=False))
    rewrite_config(tmp_path, use_lower_bound=True)
    with pytest.raises(UnsupportedError, match="expand_ratio 2 with use_lower_bound"):
        memwise.load(str(tmp_path))


def test_more_layers_than_config(tmp_path):
    write_hgrn_checkpoint(tmp_path, hgrn_config(64, 3, 50))
    rewrite_config(tmp_path, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match="holds layer.s. 2 that .*config.json does not use .it says 2 layers"):
        memwise.load(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
    write_hgrn_checkpoint(tmp_path, hgrn_config(64, 2, 50), drop=("model.layers.1.mlp.down_proj.norm.weight",))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.down_proj.norm.weight' is missing"):
        memwise.load(str(tmp_path))


def test_wrong_shape_is_named(tmp_path):
    write_hgrn_checkpoint(tmp_path, hgrn_config(64, 2, 50),
                          replace={"model.layers.1.attn.f_proj.weight": torch.zeros(64, 63, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=r"'model.layers.1.attn.f_proj.weight' has shape \[64, 63\], "
                                              r"expected \[64, 64\]"):
        memwise.load(str(tmp_path))


def test_bfloat16_compute_is_refused(small):
    with pytest.raises(UnsupportedError, match="computes in float32"):
        memwise.load(str(small[0]), dtype="bfloat16")


@pytest.fixture()
def packed_dir(small, tmp_path):
    from memwise.convert import convert
    out = tmp_path / "packed"
    convert(str(small[0]), out, progress=False)
    return out


def rewrite_weights(path, metadata=None, change=None):
    tensors = load_file(str(path / "model.safetensors"))
    meta = CheckpointReader(path).metadata
    meta.update(metadata or {})
    if change:
        change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata=meta)


def test_unknown_packed_format_version(packed_dir):
    rewrite_weights(packed_dir, {"format_version": "7"})
    with pytest.raises(CheckpointError, match="format_version '7' is not supported"):
        memwise.load(str(packed_dir))


def test_packed_tensors_without_metadata(packed_dir):
    rewrite_weights(packed_dir, {"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks format='memwise-ternary'"):
        memwise.load(str(packed_dir))


def test_invalid_packed_code(packed_dir):
    def corrupt(t):
        t["model.layers.0.attn.o_proj.weight.packed"][3, 5] = 0xFF
    rewrite_weights(packed_dir, change=corrupt)
    with pytest.raises(CheckpointError, match="o_proj.weight.packed' holds the invalid 2-bit code 3"):
        memwise.load(str(packed_dir))


def test_packed_scale_must_be_float32(packed_dir):
    def halve(t):
        t["lm_head.weight.scale"] = t["lm_head.weight.scale"].bfloat16()
    rewrite_weights(packed_dir, change=halve)
    with pytest.raises(CheckpointError, match="lm_head.weight.scale' is torch.bfloat16, expected float32"):
        memwise.load(str(packed_dir))
