"""The decoder family's float linears on the dense decode kernels (models/decoder/dense.py) against
the unchanged path (torch's F.linear everywhere) on tiny checkpoints: logits within 1e-4 and the
same greedy tokens, the tied lm_head reading the embedding in place."""
import pytest
import torch

import memwise
from memwise.kernels import dense
from memwise.models.decoder.dense import DenseLinear

from tiny_models import VOCAB, one_thread, saved, tiny_configs  # noqa: F401 (fixtures)

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(dense._c is None, reason="the C extension memwise.kernels._dense is not built")
TOLERANCE = 1e-4


def step_logits(module, prompt, steps):
    """Logits of a short prompt (one kernel-sized forward) and of `steps` greedy decode steps, [steps + 1, V]."""
    cache = module.new_cache(1, prompt.shape[1] + steps)
    with torch.no_grad():
        out = [module(prompt, cache, last_only=True)[0, -1]]
        for _ in range(steps):
            out.append(module(out[-1].argmax().reshape(1, 1), cache)[0, -1])
    return torch.stack(out)


def prompt(length=6):
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_logits_and_greedy_tokens_equal_the_torch_path(saved, name, monkeypatch):
    model = memwise.load(saved(name))
    kinds = {type(m) for m in model.module.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {DenseLinear}
    ids = prompt()
    got = step_logits(model.module, ids, 12)
    tokens = model.generate(ids, max_new_tokens=12, ignore_eos=True)
    monkeypatch.setattr(dense, "MAX_ROWS", 0)     # every product through F.linear: the unchanged path
    want = step_logits(model.module, ids, 12)
    assert (got - want).abs().max().item() < TOLERANCE * max(1.0, want.abs().max().item())
    assert torch.equal(tokens, model.generate(ids, max_new_tokens=12, ignore_eos=True))


def test_tied_lm_head_reads_the_embedding_in_place(saved):
    module = memwise.load(saved("llama3")).module
    assert module.spec.tie_word_embeddings and isinstance(module.lm_head, DenseLinear)
    assert module.lm_head.weight.data_ptr() == module.embed.weight.data_ptr()


def test_prefill_of_many_tokens_takes_torch_gemm(saved, monkeypatch):
    module = memwise.load(saved("gpt2")).module
    calls = []
    real = dense.f32_linear
    monkeypatch.setattr(dense, "f32_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    with torch.no_grad():
        module(prompt(dense.MAX_ROWS + 1))
    assert calls == []
    with torch.no_grad():
        module(prompt(dense.MAX_ROWS))
    assert calls and all(shape[:-1].numel() <= dense.MAX_ROWS for shape in calls)


def test_bfloat16_model_on_the_kernels_stays_close_to_the_torch_path(saved, monkeypatch):
    model = memwise.load(saved("llama"), dtype="bfloat16")
    ids = prompt()
    got = step_logits(model.module, ids, 4)
    monkeypatch.setattr(dense, "MAX_ROWS", 0)
    want = step_logits(model.module, ids, 4)
    # bfloat16 activations carry 8 significant bits: a product rounded differently moves logits by ~2^-8
    assert (got - want).abs().max().item() < 0.05 * (want.max() - want.min()).item()


def test_quantized_linears_stay_quantized(saved):
    model = memwise.load(saved("opt-post"), quantize="int8")
    assert all(type(m) is not torch.nn.Linear for m in model.module.modules())
    assert not isinstance(model.module.layers[0].attn.qkv, DenseLinear)
