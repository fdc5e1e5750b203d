"""llama.cpp as a benchmark engine: the GGUF writer (read back with gguf's own reader and dequantizers),
the shape twins of the MatMul-free sizes, the engine's skip reasons, and the peers suite. Only the last
test needs llama-cpp-python; the rest run where just `gguf` is installed (CI)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from memwise.bench import gguf_export  # noqa: E402
from memwise.bench.cell import CellSpec  # noqa: E402
from memwise.bench.llama_cpp_engine import INSTALL_HINT, LlamaCppEngine  # noqa: E402
from memwise.bench.sources import resolve  # noqa: E402
from memwise.bench.suites import build_matrix  # noqa: E402
from memwise.models.decoder.build import synthetic_tensors  # noqa: E402
from memwise.source import family_and_spec, resolve_model  # noqa: E402

# A small llama whose rows hold whole 256-weight blocks, so TQ2_0 and TQ1_0 can store it.
BLOCK_LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300, "rms_norm_eps": 1e-5,
               "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}


def _write(tmp_path, spec, dtype):
    path = tmp_path / f"{spec.model_type}-{dtype}.gguf"
    planned = gguf_export.write_gguf(path, spec, dtype, lambda: synthetic_tensors(spec, seed=0))
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, planned, reader


def _read(tensor) -> np.ndarray:
    """A tensor's values as float32 [rows, cols] (GGUF lists dimensions innermost first)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def _hf_to_llama_cpp(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's permute, written out: each head's rotate-half rows become interleaved pairs."""
    half = rows.shape[0] // heads // 2
    out = np.empty_like(rows)
    for h in range(heads):
        base = h * 2 * half
        out[base:base + 2 * half:2] = rows[base:base + half]
        out[base + 1:base + 2 * half:2] = rows[base + half:base + 2 * half]
    return out


def _sources(spec) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in synthetic_tensors(spec, seed=0)}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_round_trip_llama(tmp_path, dtype):
    spec = resolve_model("preset:tiny-llama").spec
    tensors, planned, reader = _write(tmp_path, spec, dtype)
    source = _sources(spec)
    assert [p.name for p in planned] == list(tensors)
    width = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    qkv = source["layers.0.attn.qkv.weight"]
    inner = spec.intermediate_size
    expected = {
        "token_embd.weight": source["embed.weight"],
        "blk.0.attn_q.weight": _hf_to_llama_cpp(qkv[:width], spec.num_heads),
        "blk.0.attn_k.weight": _hf_to_llama_cpp(qkv[width:width + kv], spec.num_kv_heads),
        "blk.0.attn_v.weight": qkv[width + kv:],
        "blk.0.ffn_gate.weight": source["layers.0.mlp.up.weight"][:inner],
        "blk.0.ffn_up.weight": source["layers.0.mlp.up.weight"][inner:],
        "blk.1.ffn_down.weight": source["layers.1.mlp.down.weight"],
        "output_norm.weight": source["norm.weight"],
        "output.weight": source["lm_head.weight"],
    }
    cast = np.float32 if dtype == "float32" else np.float16
    for name, values in expected.items():
        tensor = tensors[name]
        assert tensor.tensor_type.name == ("F32" if values.ndim == 1 else gguf_export.gguf_type(dtype)), name
        np.testing.assert_array_equal(_read(tensor), values.astype(cast).astype(np.float32), err_msg=name)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == spec.vocab_size


def test_float_round_trip_gpt2(tmp_path):
    spec = resolve_model("preset:tiny-gpt2").spec
    tensors, planned, _ = _write(tmp_path, spec, "float32")
    source = _sources(spec)
    assert "output.weight" not in tensors        # tied: llama.cpp reads token_embd for the output
    pairs = {"token_embd.weight": "embed.weight", "position_embd.weight": "positions.weight",
             "blk.0.attn_qkv.weight": "layers.0.attn.qkv.weight", "blk.0.attn_qkv.bias": "layers.0.attn.qkv.bias",
             "blk.1.ffn_up.weight": "layers.1.mlp.up.weight", "blk.1.ffn_norm.weight": "layers.1.mlp_norm.weight",
             "output_norm.bias": "norm.bias"}
    for name, parameter in pairs.items():
        np.testing.assert_array_equal(_read(tensors[name]), source[parameter], err_msg=name)
        assert tuple(int(n) for n in reversed(tensors[name].shape)) == source[parameter].shape


@pytest.mark.parametrize("dtype, tolerance", [("q8_0", 1 / 127), ("q4_0", 1 / 7)])
def test_quantized_round_trip(tmp_path, dtype, tolerance):
    """Q8_0 / Q4_0 blocks are what gguf's own quantizer makes of the source, within its rounding."""
    spec = resolve_model("preset:tiny-llama").spec
    tensors, planned, _ = _write(tmp_path, spec, dtype)
    source = _sources(spec)
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    for item in planned:
        values = source[item.parameter]
        if item.rows:
            values = values[item.rows[0]:item.rows[1]]
        if item.permute_heads:
            values = _hf_to_llama_cpp(values, item.permute_heads)
        tensor = tensors[item.name]
        if values.ndim == 1:
            assert tensor.tensor_type.name == "F32"
            continue
        assert tensor.tensor_type == qtype, item.name
        read = _read(tensor)
        own = gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)
        np.testing.assert_array_equal(read, own, err_msg=item.name)
        assert np.abs(read - values).max() <= tolerance * np.abs(values).max() * 1.01, item.name


@pytest.mark.parametrize("dtype", ["tq2_0", "tq1_0"])
def test_ternary_codes_exact(tmp_path, dtype):
    """TQ2_0 / TQ1_0: every matrix's codes are memwise's ternarization of it, exactly, at its scale."""
    from memwise.kernels.packed import quantize_latent

    spec = family_and_spec(BLOCK_LLAMA, "test config")[1]
    tensors, planned, _ = _write(tmp_path, spec, dtype)
    source = _sources(spec)
    for item in planned:
        tensor = tensors[item.name]
        if item.name == "token_embd.weight" or len(item.shape) == 1:
            assert tensor.tensor_type.name == ("F16" if len(item.shape) == 2 else "F32")
            continue
        assert tensor.tensor_type.name == dtype.upper(), item.name
        values = source[item.parameter]
        if item.rows:
            values = values[item.rows[0]:item.rows[1]]
        if item.permute_heads:
            values = _hf_to_llama_cpp(values, item.permute_heads)
        codes, scale = quantize_latent(torch.from_numpy(np.ascontiguousarray(values)))
        read = _read(tensor)
        step = np.float32(np.float16(scale))
        np.testing.assert_array_equal(read / step, codes.numpy().astype(np.float32), err_msg=item.name)


def test_block_mismatch_is_one_line(tmp_path):
    spec = resolve_model("preset:tiny-llama").spec       # rows of 64 weights: no 256-weight blocks
    with pytest.raises(gguf_export.UnsupportedError, match="TQ2_0 cannot store"):
        gguf_export.write_gguf(tmp_path / "x.gguf", spec, "tq2_0", lambda: synthetic_tensors(spec))
    assert not list(tmp_path.iterdir())     # no partial file left behind


def test_export_is_cached_under_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = gguf_export.export("preset:tiny-llama", "q8_0")
    assert path.parent.parent == tmp_path / "memwise" / "gguf" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert gguf_export.export("preset:tiny-llama", "q8_0") == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(gguf_export.UnsupportedError, match="mmfree-2.7b-shapes"):
        gguf_export.export("preset:tiny-mmfree", "tq2_0")
    # a preset whose config changes gets a new file
    from memwise import presets
    monkeypatch.setitem(presets.PRESETS, "tiny-llama", {**presets.PRESETS["tiny-llama"], "rms_norm_eps": 1e-6})
    changed = gguf_export.export("preset:tiny-llama", "q8_0")
    assert changed != path and changed.is_file()


@pytest.mark.parametrize("size", ["370m", "1.3b", "2.7b"])
def test_shape_twins_match_mmfree(size):
    """Every ternary matrix of an HGRN-Bit size has a twin of its shape in the Llama preset (gate_proj
    as gate and up halves), and nothing else: the same ternary bytes per token."""
    from memwise.models.hgrn_bit.layout import checkpoint_layout

    hgrn = resolve_model(f"preset:mmfree-{size}").spec
    twin = resolve_model(f"preset:mmfree-{size}-shapes").spec
    expected = []
    for slot in checkpoint_layout(hgrn):
        if not slot.ternary:
            continue
        rows, cols = slot.shape
        halves = [(rows // 2, cols)] * 2 if slot.name.endswith("mlp.gate_proj.weight") else [(rows, cols)]
        expected.extend(halves)
    found = [p.shape for p in gguf_export.plan(twin, "TQ2_0") if len(p.shape) == 2 and p.name != "token_embd.weight"]
    assert sorted(found) == sorted(expected)
    assert twin.head_dim in (64, 128) and twin.vocab_size == hgrn.vocab_size
    assert [p.ggml_type for p in gguf_export.plan(twin, "TQ2_0") if p.name == "output.weight"] == ["TQ2_0"]


def test_skip_reason_without_llama_cpp(monkeypatch):
    """With llama_cpp unimportable (None in sys.modules makes `import llama_cpp` raise ImportError), the
    engine and the runner say how to install it; the cell is skipped, never an error."""
    from memwise.bench.runner import RunOptions, run_matrix
    from memwise.bench.suites import Matrix

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert LlamaCppEngine().can_run(resolve("preset:tiny-llama"), "cpu") == INSTALL_HINT
    matrix = Matrix(models=["preset:tiny-llama"], engines=["llama.cpp"], dtypes=["q8_0"], runs=1, warmup=0,
                    new_tokens=[4], prompt_tokens=[4])
    [record] = run_matrix(matrix, RunOptions())
    assert record["status"] == "skipped" and "pip install 'memwise[peers]'" in record["reason"]


def test_export_failure_is_an_error_record(tmp_path, monkeypatch):
    """A GGUF the exporter cannot write ends that cell with a one-line reason; no cell process starts."""
    import memwise.bench.llama_cpp_engine as engine_module
    from memwise.bench.runner import RunOptions, run_matrix
    from memwise.bench.suites import Matrix

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(engine_module, "llama_cpp_missing", lambda: None)     # as if installed
    matrix = Matrix(models=["preset:tiny-llama"], engines=["llama.cpp"], dtypes=["tq2_0"], runs=1, warmup=0,
                    new_tokens=[4], prompt_tokens=[4])
    [record] = run_matrix(matrix, RunOptions())
    assert record["status"] == "error" and record["wall_s"] is None
    assert record["reason"].startswith("preparing the llama.cpp cell failed: GGUF export: tensor")


def test_cell_reasons():
    engine = LlamaCppEngine()
    source = resolve("preset:tiny-llama")
    assert "batch 1 only" in engine.cell_reason(CellSpec("m", {}, "llama.cpp", batch_size=4))
    assert engine.cell_reason(CellSpec("m", {}, "llama.cpp", dtype="tq2_0")) is None
    if engine.can_run(source, "cpu") is None:
        assert "hgrn_bit" in engine.can_run(resolve("preset:tiny-mmfree"), "cpu")


def test_llama_cpp_cell_modules_do_not_import_torch():
    """A llama.cpp cell's process holds what llama.cpp's does: the modules it imports leave torch out."""
    code = ("import sys, memwise.bench.cell, memwise.bench.engines, memwise.bench.memory, "
            "memwise.bench.llama_cpp_engine; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_peers_suite_cells():
    cells = build_matrix("peers").cells()
    assert cells == [
        ("mmfree-370m", "memwise", "float32", 1, 128, 128),
        ("mmfree-370m", "memwise-lite", "float32", 1, 128, 128),
        ("preset:mmfree-370m-shapes", "llama.cpp", "tq2_0", 1, 128, 128),
        ("mmfree-2.7b", "memwise", "float32", 1, 128, 128),
        ("mmfree-2.7b", "memwise-lite", "float32", 1, 128, 128),
        ("preset:mmfree-2.7b-shapes", "llama.cpp", "tq2_0", 1, 128, 128),
        ("gpt2-medium", "memwise", "float32", 1, 128, 128),
        ("gpt2-medium", "llama.cpp", "float32", 1, 128, 128),
        ("gpt2-medium", "memwise", "int8", 1, 128, 128),
        ("gpt2-medium", "llama.cpp", "q8_0", 1, 128, 128),
        ("gpt2-medium", "memwise", "int4", 1, 128, 128),
        ("gpt2-medium", "llama.cpp", "q4_0", 1, 128, 128),
        ("bitnet-b1.58-large", "memwise", "float32", 1, 128, 128),
        ("bitnet-b1.58-large", "memwise-lite", "float32", 1, 128, 128),
        ("bitnet-b1.58-large", "llama.cpp", "tq2_0", 1, 128, 128),
        ("bitnet-b1.58-large", "transformers", "float32", 1, 128, 128),
    ]


TINY_PHI = {"model_type": "phi", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "partial_rotary_factor": 0.5, "vocab_size": 512, "hidden_act": "gelu_new",
            "max_position_embeddings": 128, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "phi"])
def test_llama_cpp_greedy_matches_memwise(tmp_path, model):
    """The same F32 weights give the same greedy tokens in llama.cpp and in memwise."""
    pytest.importorskip("llama_cpp")
    from memwise.bench.sources import Source
    from memwise.language_model import LanguageModel
    from memwise.models.decoder import synthetic
    from memwise.tokenizer import ByteTokenizer

    config = TINY_PHI if model == "phi" else resolve(f"preset:{model}").config
    spec = family_and_spec(config, model)[1]
    path = tmp_path / "model.gguf"
    gguf_export.write_gguf(path, spec, "float32", lambda: synthetic_tensors(spec, seed=0))
    cell = CellSpec(model, {}, "llama.cpp", dtype="float32", prompt_tokens=6, new_tokens=8, threads=1,
                    engine_file=str(path))
    engine = LlamaCppEngine()
    engine.configure(cell)
    engine.load(Source(model, model, "preset", "synthetic", config), "float32", "cpu")
    prompt = [[72, 101, 108, 108, 111, 33]]

    class Request:
        max_new_tokens = 8

    timing = engine.generate(np.array(prompt), Request())
    assert timing.new_tokens == 8 and timing.counters["n_eval"] == 7
    memwise_model = LanguageModel(spec, synthetic(spec, seed=0), ByteTokenizer(spec.vocab_size), torch.float32,
                                  torch.device("cpu"))
    expected = memwise_model.generate(torch.tensor(prompt), max_new_tokens=8, ignore_eos=True)[0, 6:].tolist()
    assert engine.last_tokens == expected


# 1bitLLM's Llama-shaped BitNet b1.58, tied (llama.cpp's bitnet graph has no output matrix)
TINY_ONE_BIT_LLM = {"model_type": "llama", "architectures": ["BitnetForCausalLM"], "vocab_size": 300,
                    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
                    "rope_theta": 10000.0, "hidden_act": "silu", "weight_bits": 1, "input_bits": 8,
                    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}


def _tiny_bitnet():
    from memwise.models import bitnet

    spec = family_and_spec(TINY_ONE_BIT_LLM, "tiny 1bitLLM")[1]
    return spec, bitnet.synthetic(spec, seed=0)


@pytest.mark.parametrize("dtype", ["tq2_0", "tq1_0"])
def test_bitnet_gguf_holds_the_models_codes(tmp_path, dtype):
    """Every ternary matrix of the file dequantizes to the model's codes times its scale in float16."""
    from gguf import GGUFReader, quants

    from memwise.bench.gguf_bitnet import write_bitnet_gguf

    spec, model = _tiny_bitnet()
    path = tmp_path / "bitnet.gguf"
    write_bitnet_gguf(path, model, dtype, "tiny")
    stored = {t.name: t for t in GGUFReader(str(path)).tensors}
    assert "output.weight" not in stored and len(stored) == 2 + spec.num_layers * 11
    layer = model.layers[1]
    for name, projection, index in (("attn_k", layer.attn.qkv, 1), ("ffn_up", layer.mlp.gate_up, 1),
                                    ("ffn_down", layer.mlp.down, 0)):
        tensor = stored[f"blk.1.{name}.weight"]
        assert tensor.tensor_type.name == gguf_export.gguf_type(dtype)
        values = quants.dequantize(tensor.data, tensor.tensor_type).reshape(projection.rows[index], projection.cols)
        weight = projection.weight(index)
        expected = weight.ternary().numpy() * np.float32(np.float16(weight.scale))
        np.testing.assert_array_equal(values, expected)
    norm = stored["blk.1.ffn_sub_norm.weight"]
    np.testing.assert_array_equal(norm.data, layer.mlp.down.norm_weight.numpy())


def test_bitnet_gguf_runs_in_llama_cpp_like_memwise(tmp_path):
    """llama.cpp's bitnet graph on the exported file: the logits of memwise's model within 5% of their
    spread (llama.cpp multiplies float activations, memwise int8 ones), the same greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from memwise.bench.gguf_bitnet import write_bitnet_gguf
    from memwise.language_model import LanguageModel
    from memwise.tokenizer import ByteTokenizer

    spec, model = _tiny_bitnet()
    path = tmp_path / "bitnet.gguf"
    write_bitnet_gguf(path, model, "float32", "tiny")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    prompt = [72, 101, 108, 108, 111, 33]
    llm.eval(prompt)
    theirs = np.array(llm.scores[:len(prompt)])
    language_model = LanguageModel(spec, model, ByteTokenizer(spec.vocab_size), torch.float32, torch.device("cpu"))
    ours = language_model.logits(torch.tensor([prompt]))[0].numpy()
    assert np.abs(theirs - ours).max() <= 0.05 * (ours.max() - ours.min())
    llm.reset()
    tokens = [t for _, t in zip(range(6), llm.generate(prompt, temp=0.0))]
    expected = language_model.generate(torch.tensor([prompt]), max_new_tokens=6, ignore_eos=True)[0, 6:].tolist()
    assert tokens == expected


def test_bitnet_2b_4t_and_untied_models_are_refused_for_llama_cpp(tmp_path):
    from memwise.bench.gguf_bitnet import write_bitnet_gguf
    from memwise.errors import UnsupportedError
    from memwise.models import bitnet

    spec = resolve_model("preset:tiny-bitnet").spec
    with pytest.raises(UnsupportedError, match="GLU is 'relu2'"):
        write_bitnet_gguf(tmp_path / "x.gguf", bitnet.synthetic(spec), "tq2_0", "tiny")
    untied = family_and_spec({**TINY_ONE_BIT_LLM, "tie_word_embeddings": False}, "tiny")[1]
    with pytest.raises(UnsupportedError, match="no output matrix"):
        write_bitnet_gguf(tmp_path / "x.gguf", bitnet.synthetic(untied), "tq2_0", "tiny")
    assert not list(tmp_path.iterdir())
