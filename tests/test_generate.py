"""Generation options against Hugging Face generate on the same tiny checkpoint, plus memwise's own rules."""
import pytest
import torch

import memwise
from memwise.errors import MemwiseError
from memwise.generate import banned_ngram_tokens

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=64, n_positions=128,
                                     bos_token_id=0, eos_token_id=0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path)
    return hf, memwise.load(path)


PROMPT = torch.tensor([[3, 9, 27, 17, 5, 44, 12]])


def hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("options", [
    {},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.7},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 3, "repetition_penalty": 1.1},
])
def test_greedy_options_match_hf(pair, options):
    hf, model = pair
    expected = hf_generate(hf, PROMPT, max_new_tokens=24, min_new_tokens=24, eos_token_id=None, **options)
    got = model.generate(PROMPT, max_new_tokens=24, ignore_eos=True, **options)
    assert torch.equal(got, expected)


def test_eos_stops_and_min_new_tokens(pair):
    hf, model = pair
    free = model.generate(PROMPT, max_new_tokens=20, ignore_eos=True)[0, PROMPT.shape[1]:].tolist()
    eos = free[3]
    first = free.index(eos)
    model.spec.eos_token_ids = (eos,)
    try:
        got = model.generate(PROMPT, max_new_tokens=20)
        assert got.shape[1] == PROMPT.shape[1] + first + 1 and int(got[0, -1]) == eos
        expected = hf_generate(hf, PROMPT, max_new_tokens=20, eos_token_id=eos)
        assert torch.equal(got, expected)
        # min_new_tokens forbids EOS until then, like HF's MinNewTokensLengthLogitsProcessor.
        got_min = model.generate(PROMPT, max_new_tokens=20, min_new_tokens=first + 2)
        expected_min = hf_generate(hf, PROMPT, max_new_tokens=20, eos_token_id=eos, min_new_tokens=first + 2)
        assert torch.equal(got_min, expected_min)
        assert eos not in got_min[0, PROMPT.shape[1]:PROMPT.shape[1] + first + 2].tolist()
    finally:
        model.spec.eos_token_ids = (0,)


def test_batch_stops_rows_independently(pair):
    _, model = pair
    other = torch.tensor([[8, 1, 60, 33, 2, 2, 50]])
    free = model.generate(PROMPT, max_new_tokens=12, ignore_eos=True)[0, PROMPT.shape[1]:].tolist()
    eos = free[2]
    model.spec.eos_token_ids = (eos,)
    try:
        alone = [model.generate(p, max_new_tokens=12) for p in (PROMPT, other)]
        both = model.generate(torch.cat([PROMPT, other]), max_new_tokens=12)
        for row, single in zip(both, alone):
            n = single.shape[1]
            assert torch.equal(row[:n], single[0])
            assert all(t == model.pad_token_id for t in row[n:].tolist())  # finished rows get padding
    finally:
        model.spec.eos_token_ids = (0,)


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    _, model = pair
    a = model.generate(PROMPT, max_new_tokens=16, do_sample=True, seed=5, ignore_eos=True)
    b = model.generate(PROMPT, max_new_tokens=16, do_sample=True, seed=5, ignore_eos=True)
    c = model.generate(PROMPT, max_new_tokens=16, do_sample=True, seed=6, temperature=5.0, ignore_eos=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=16, do_sample=True, top_k=1, seed=1, ignore_eos=True), greedy)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=16, do_sample=True, top_p=1e-6, seed=1, ignore_eos=True), greedy)


def test_top_p_keeps_the_smallest_set_reaching_p(pair):
    from memwise.generate import GenerationOptions, sample_next
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    opts = GenerationOptions(do_sample=True, top_p=0.8)
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, opts, g)) for _ in range(300)}
    assert drawn == {0, 1}


def test_stream_yields_what_generate_returns(pair):
    _, model = pair
    streamed = [int(t[0]) for t in model.stream(PROMPT, max_new_tokens=10, ignore_eos=True)]
    assert streamed == model.generate(PROMPT, max_new_tokens=10, ignore_eos=True)[0, PROMPT.shape[1]:].tolist()


def test_stop_strings_on_preset():
    model = memwise.load("preset:tiny-gpt2")
    prompt = model.encode_batch(["hello"])[0]
    free = model.generate(prompt, max_new_tokens=40, ignore_eos=True)[0, prompt.shape[1]:].tolist()
    texts = [model.tokenizer.decode(free[:i + 1]) for i in range(len(free))]
    first = next((i for i, t in enumerate(texts) if t), None)
    if first is None:
        pytest.fail("the preset generated no decodable byte in 40 tokens; pick another prompt")
    got = model.generate(prompt, max_new_tokens=40, ignore_eos=True, stop_strings=texts[first][-1])
    assert got.shape[1] == prompt.shape[1] + first + 1


def test_banned_ngrams():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 1], 2) == {2}
    assert banned_ngram_tokens([1], 3) == set()


@pytest.mark.parametrize("bad", [
    {"max_new_tokens": 0}, {"top_k": 0, "do_sample": True}, {"top_p": 1.5, "do_sample": True},
    {"temperature": 0.0, "do_sample": True}, {"repetition_penalty": 0.0}, {"nucleus": 0.9},
])
def test_bad_options(pair, bad):
    _, model = pair
    kwargs = {"max_new_tokens": 4, **bad}
    with pytest.raises(MemwiseError):
        list(model.stream(PROMPT, **kwargs))


def test_bad_inputs(pair):
    _, model = pair
    with pytest.raises(MemwiseError, match="outside the vocabulary"):
        model.logits(torch.tensor([[1, 64]]))
    with pytest.raises(MemwiseError, match="padding must be on the left"):
        model.logits(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 0]]))
    with pytest.raises(MemwiseError, match="exceed this model's 128 positions"):
        model.generate(PROMPT, max_new_tokens=125)


def test_greedy_picks_the_first_of_equal_maxima() -> None:
    # Hugging Face's greedy search uses argmax, which returns the first maximal index; ties are
    # common once logits are masked with -inf or are equal in float32.
    from memwise.generate import GenerationOptions, sample_next
    logits = torch.tensor([[1.0, 5.0, 5.0, 2.0], [7.0, 7.0, 0.0, 7.0], [-float("inf"), -1.0, -1.0, -2.0]])
    got = sample_next(logits, GenerationOptions(), None)
    assert got.tolist() == [1, 0, 1] == logits.argmax(dim=-1).tolist()


def test_the_token_buffer_grows_as_tokens_come(monkeypatch):
    # Repetition penalty and the n-gram rule read the whole buffer: a buffer that starts at 2 tokens
    # and doubles must give the same tokens as one reserved up front.
    import memwise.generate as generate
    model = memwise.load("preset:tiny-llama")
    options = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, ignore_eos=True)
    reserved = model.generate([[5, 6, 7], [9, 9, 9]], max_new_tokens=40, **options)
    monkeypatch.setattr(generate, "FIRST_CAPACITY", 2)
    assert torch.equal(model.generate([[5, 6, 7], [9, 9, 9]], max_new_tokens=40, **options), reserved)


def test_a_recurrent_model_streams_without_reserving_for_max_new_tokens():
    # Its state is constant in the length, so 10^12 requested tokens fit; only the tokens made take memory.
    import itertools
    model = memwise.load("preset:tiny-mmfree")
    steps = list(itertools.islice(model.stream([[5, 6, 7]], max_new_tokens=10**12, ignore_eos=True), 3))
    assert len(steps) == 3
