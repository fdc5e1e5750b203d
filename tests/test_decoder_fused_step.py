"""The fused C decode step of quantized decoders (memwise.models.decoder.fused_step) against the
PyTorch path (MEMWISE_FUSED_STEP=0: the model's modules, each product one C call).

The PyTorch path is the specification. The integer products inside the fused step are the kernel
library's and exact (tests of the kernels); the float work between them (LayerNorm, the per-token
quantization, softmax, GELU) runs in the C code's own order, so logits agree to rounding, not bit
for bit. Checkpoints are tiny Hugging Face models that the tests write (tiny_models.py).
"""
from __future__ import annotations

import os

import pytest
import torch
import transformers

import memwise
from memwise import kernels
from memwise.models.decoder import fused_step as fused

import reference_checks as checks
from reference_checks import assert_close
from tiny_models import VOCAB, one_thread, randomize, saved  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not fused.available(), reason="the C extension with the fused step is not built")

PATHS = kernels.isa_paths() if not os.environ.get("MEMWISE_ISA") else kernels._machine_isas()

# Tolerance on logits and cached keys/values, relative to their spread. Float order differences
# (LayerNorm's sums, the softmax, exp) are ~1e-7 of the spread; an activation within an ulp of an
# int8 rounding boundary can move one step, moving its projection's outputs by one weight times
# max|x| / 127, well below this after two layers. Measured on these models: at most ~3e-7 of the
# spread, no step moved.
STEP_REL = 1e-3

# llama: grouped query attention (4 heads over 2), rotary, RMSNorm, SiLU GLU; llama3: one key/value
# head, llama3 rope scaling, attention and MLP biases.
MODELS = [("gpt2", "int8"), ("gpt2", "int4"), ("opt", "int8"), ("opt", "int4"), ("gpt2-odd", "int8"),
          ("gpt2-odd", "int4"), ("llama", "int8"), ("llama", "int4"), ("llama3", "int4")]


@pytest.fixture(scope="module")
def checkpoints(saved, tmp_path_factory):
    """name -> a tiny checkpoint directory; "gpt2-odd" has widths off the 64-column padding of the
    quantized layouts (hidden 40, inner 100) and head_dim 10, off the 16-lane vectors."""
    directory = tmp_path_factory.mktemp("gpt2-odd")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=40, n_layer=3, n_head=4, n_inner=100, n_positions=64,
                                     vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model)
    model.save_pretrained(directory)
    return lambda name: directory if name == "gpt2-odd" else saved(name)


@pytest.fixture(scope="module", params=MODELS, ids=["-".join(m) for m in MODELS])
def model(request, checkpoints):
    name, scheme = request.param
    return memwise.load(str(checkpoints(name)), quantize=scheme)


@pytest.fixture
def fused_calls(count_calls) -> list[int]:
    """Counts FusedDecoder.step calls (the real step runs)."""
    return count_calls(fused.FusedDecoder, "step")


def prompt(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(module, fused_on: bool, *args, **kwargs) -> torch.Tensor:
    previous = os.environ.get("MEMWISE_FUSED_STEP")
    os.environ["MEMWISE_FUSED_STEP"] = "1" if fused_on else "0"
    try:
        with torch.inference_mode():
            return module(*args, **kwargs)
    finally:
        if previous is None:
            del os.environ["MEMWISE_FUSED_STEP"]
        else:
            os.environ["MEMWISE_FUSED_STEP"] = previous


def decode_side_by_side(module, ids: torch.Tensor, steps: int) -> None:
    """The fused step against the PyTorch path, token by token (reference_checks.decode_side_by_side)."""
    checks.decode_side_by_side(module, ids, steps, lambda on, *args, **kwargs: run(module, on, *args, **kwargs),
                               STEP_REL)


def test_decode_matches_pytorch_path(model, fused_calls) -> None:
    decode_side_by_side(model.module, prompt(5, seed=1), steps=6)
    assert len(fused_calls) == 6


def test_decode_from_an_empty_cache(model, fused_calls) -> None:
    # The first token of a sequence: attention over the one slot it writes.
    module = model.module
    caches = {on: module.new_cache(1, 4) for on in (False, True)}
    token = prompt(1, seed=3)
    for _ in range(3):
        logits = {on: run(module, on, token, caches[on]) for on in (False, True)}
        assert_close(logits[True], logits[False], STEP_REL)
        token = logits[False][:, -1].argmax(-1, keepdim=True)
    assert len(fused_calls) == 3


@pytest.mark.parametrize("isa", PATHS)
def test_every_isa_path(isa: str, monkeypatch: pytest.MonkeyPatch, model, fused_calls) -> None:
    monkeypatch.setenv("MEMWISE_ISA", isa)
    decode_side_by_side(model.module, prompt(6, seed=4), steps=4)
    assert len(fused_calls) == 4


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads: int, monkeypatch: pytest.MonkeyPatch, model, fused_calls) -> None:
    # Threads split output rows in the products and heads in attention; the count is fixed so that
    # other processes on the machine do not change it.
    monkeypatch.setenv("MEMWISE_FIXED_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        decode_side_by_side(model.module, prompt(3, seed=5), steps=3)
    finally:
        torch.set_num_threads(previous)
    assert len(fused_calls) == 3


def test_greedy_tokens_identical(model, fused_calls, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = prompt(5, seed=6)
    fused_tokens = model.generate(ids, 16, ignore_eos=True)
    assert len(fused_calls) == 15       # every step after the prefill
    monkeypatch.setenv("MEMWISE_FUSED_STEP", "0")
    assert torch.equal(fused_tokens, model.generate(ids, 16, ignore_eos=True))
    assert len(fused_calls) == 15
    assert fused_tokens.shape == (1, 5 + 16)


def test_batches_and_padding_take_the_pytorch_path(model, fused_calls) -> None:
    module = model.module
    ids = prompt(4, seed=7, batch=2)
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    for rows, row_mask in ((ids, None), (ids, mask), (ids[:1], mask[:1])):    # batch 2; padded; padded batch 1
        results = {}
        for on in (True, False):
            cache = module.new_cache(rows.shape[0], 8)
            run(module, on, rows, cache, row_mask, last_only=True)
            step_mask = None if row_mask is None else torch.ones(rows.shape[0], 1, dtype=torch.bool)
            results[on] = run(module, on, rows[:, -1:], cache, step_mask, last_only=True)
        assert torch.equal(results[True], results[False])
    # A padding token fed at decode time to an unpadded cache.
    cache = module.new_cache(1, 8)
    run(module, True, ids[:1], cache, last_only=True)
    run(module, True, ids[:1, -1:], cache, torch.tensor([[False]]), last_only=True)
    assert cache.padded
    assert fused_calls == []


@pytest.mark.parametrize("kv_cache", ["int8", "int4"])
def test_a_quantized_kv_cache_takes_the_pytorch_path(checkpoints, kv_cache, fused_calls) -> None:
    model = memwise.load(str(checkpoints("gpt2")), quantize="int8", kv_cache=kv_cache)
    tokens = model.generate(prompt(4, seed=8), 4, ignore_eos=True)
    assert tokens.shape == (1, 8)
    assert fused_calls == []


def test_a_sliding_window_hands_over_to_the_pytorch_path(checkpoints, fused_calls) -> None:
    # mistral's window here is 6 slots: steps that would attend past it run the PyTorch modules.
    model = memwise.load(str(checkpoints("mistral")), quantize="int4")
    assert model.spec.sliding_window == 6
    decode_side_by_side(model.module, prompt(2, seed=11), steps=3)      # slots 2, 3, 4: inside the window
    assert len(fused_calls) == 3
    decode_side_by_side(model.module, prompt(3, seed=12), steps=5)      # slots 3..5 fused, 6 and 7 not
    assert len(fused_calls) == 3 + 3


@pytest.mark.parametrize("name,options", [("gpt2", {}), ("gpt2", {"quantize": "nf4"}), ("opt-post", {"quantize": "int8"}),
                                          ("phi", {"quantize": "int8"})])
def test_other_models_have_no_fused_step(checkpoints, name, options, fused_calls) -> None:
    # float32 and nf4 layers, opt-350m's post-norm layers and phi's parallel blocks keep the PyTorch path.
    model = memwise.load(str(checkpoints(name)), **options)
    assert not fused.supports(model.module)
    model.generate(prompt(4, seed=9), 3, ignore_eos=True)
    assert fused_calls == []
    assert model.module._fused_decoder is False
    with pytest.raises(kernels.KernelInputError, match="no fused step"):
        fused.FusedDecoder(model.module)


def test_mirrors_match_the_extension() -> None:
    assert fused.layout_mismatches() == []


def test_decoder_follows_the_model_tensors(model) -> None:
    # .to() and friends drop the decoder, whose views point into the old tensors.
    module = model.module
    cache = module.new_cache(1, 4)
    run(module, True, prompt(1, seed=10), cache)
    assert isinstance(module._fused_decoder, fused.FusedDecoder)
    module.float()
    assert module._fused_decoder is None
