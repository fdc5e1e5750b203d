"""Incremental decoding: streamed text equals decode(all ids), stop strings across tokens, the CLI's output."""
import os
import random
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import memwise
from memwise.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder, decode_stream

TEXT = "héllo wörld ✓ 日本, and then some more plain text: ü ≠ ∑ 🙂!"


def streamed(stream, ids):
    return "".join(stream.step(i) for i in ids)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A GPT-2 style byte-level BPE, trained here on text without the multi-byte characters of TEXT."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path = tmp_path_factory.mktemp("byte_level") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory):
    """A Llama style tokenizer: pieces with a leading "▁", bytes for characters outside the vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in "▁abcdefghijklmnopqrstuvwxyzé,:!":
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    path = tmp_path_factory.mktemp("byte_fallback") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
def test_hf_stream_equals_decode(name, request):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    stream = tokenizer.decode_stream()
    steps = [stream.step(i) for i in ids]
    assert "".join(steps) == TEXT
    # Some character was split across tokens and held back until it was complete.
    assert "" in steps and all("\ufffd" not in s for s in steps)
    # Special tokens are skipped, as decode skips them.
    special = {"byte_level": "<|endoftext|>", "byte_fallback": "</s>"}[name]
    with_special = ids[:3] + [tokenizer._tok.token_to_id(special)] + ids[3:]
    assert streamed(tokenizer.decode_stream(), with_special) == tokenizer.decode(with_special) == TEXT


def test_byte_level_stream_equals_decode_on_any_ids(byte_level):
    """Random ids decode to invalid UTF-8 now and then; the stream still ends where decode does."""
    rng = random.Random(0)
    tail = byte_level.encode(" ok")
    for _ in range(50):
        ids = [rng.randrange(300) for _ in range(40)] + tail
        assert streamed(byte_level.decode_stream(), ids) == byte_level.decode(ids)


def test_byte_tokenizer_stream_equals_decode():
    tokenizer = ByteTokenizer(512)
    ids = tokenizer.encode(TEXT)
    stream = tokenizer.decode_stream()
    steps = [stream.step(i) for i in ids]
    assert "".join(steps) == TEXT
    assert steps[:3] == ["h", "", "é"]        # é is two bytes: nothing, then the whole character
    rng = random.Random(0)
    for _ in range(200):                       # invalid UTF-8 and ids >= 256 (no byte) included
        ids = [rng.randrange(512) for _ in range(30)] + [ord("!")]
        assert streamed(tokenizer.decode_stream(), ids) == tokenizer.decode(ids)
        assert streamed(IncrementalDecoder(tokenizer.decode), ids) == tokenizer.decode(ids)


def test_incremental_decoder_over_any_decode_function(byte_fallback):
    ids = byte_fallback.encode(TEXT)
    assert streamed(IncrementalDecoder(byte_fallback.decode), ids) == TEXT
    # decode_stream takes a tokenizer, its bound decode (what generate passes), or a plain function.
    assert type(decode_stream(byte_fallback.decode)) is type(byte_fallback.decode_stream())
    assert isinstance(decode_stream(ByteTokenizer(256).decode), type(ByteTokenizer(256).decode_stream()))
    assert streamed(decode_stream(lambda ids: ByteTokenizer(256).decode(ids)), list(TEXT.encode())) == TEXT


def test_incremental_decoder_is_linear():
    """The window it decodes stays short: the ids decoded over a whole stream grow with its length only."""
    tokenizer = ByteTokenizer(256)
    decoded = []

    def counting_decode(ids):
        decoded.append(len(ids))
        return tokenizer.decode(ids)

    ids = tokenizer.encode(TEXT * 40)
    assert streamed(IncrementalDecoder(counting_decode), ids) == TEXT * 40
    assert max(decoded) <= 8 and sum(decoded) <= 8 * len(ids)


def boundary_stop(decode, tokens):
    """(j, s): a two-character string s made of the last character of decode(tokens[:j]) and the first
    that tokens[j] adds, appearing nowhere in decode(tokens[:j]); None if the text has no such place."""
    for j in range(1, len(tokens)):
        before, after = decode(tokens[:j]), decode(tokens[:j + 1])
        if not before or len(after) <= len(before) or not after.startswith(before):
            continue
        s = before[-1] + after[len(before)]
        if "\ufffd" not in s and s not in before:
            return j, s
    return None


def test_stop_string_across_tokens_on_preset():
    """Each row stops at the token that completes the stop string, mirroring decode of its whole text."""
    model = memwise.load("preset:tiny-gpt2")
    ids, mask = model.encode_batch(["hello", "world"])
    free = model.generate(ids, 40, mask, ignore_eos=True)[:, ids.shape[1]:].tolist()
    found = boundary_stop(model.tokenizer.decode, free[0])
    if found is None:
        pytest.fail("the preset generated no two decodable characters in 40 tokens; pick another prompt")
    j, stop = found
    ends = []
    for row in free:
        hits = [i for i in range(len(row)) if stop in model.tokenizer.decode(row[:i + 1])]
        ends.append(hits[0] + 1 if hits else len(row))
    assert ends[0] == j + 1
    got = model.generate(ids, 40, mask, ignore_eos=True, stop_strings=stop)[:, ids.shape[1]:]
    assert got.shape[1] == max(ends)
    for row, end, out in zip(free, ends, got.tolist()):
        assert out[:end] == row[:end]
        assert out[end:] == [model.pad_token_id] * (got.shape[1] - end)


def test_stop_string_across_tokens_with_hf_tokenizer(byte_level, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=300,
                                     bos_token_id=0, eos_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(byte_level.path.read_text())
    model = memwise.load(tmp_path)
    ids, mask = model.encode_batch(["hello world"])
    free = model.generate(ids, 48, mask, ignore_eos=True)[0, ids.shape[1]:].tolist()
    found = boundary_stop(model.tokenizer.decode, free)
    if found is None:
        pytest.fail("the tiny model generated no two decodable characters in 48 tokens")
    j, stop = found
    got = model.generate(ids, 48, mask, ignore_eos=True, stop_strings=[stop, "\u2603 never generated"])
    assert got[0, ids.shape[1]:].tolist() == free[:j + 1]


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-mmfree"])
def test_cli_prints_the_decoded_text(preset):
    prompt, n = "héllo ✓", 48
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run([sys.executable, "-m", "memwise.cli", "generate", f"preset:{preset}", "--prompt", prompt,
                          "--max-new-tokens", str(n), "--ignore-eos"], capture_output=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    stdout = run.stdout.decode("utf-8")
    text, stats = stdout[:stdout.rindex("\n[")], stdout[stdout.rindex("\n[") + 1:]
    assert stats.startswith(f"[{n} tokens | TTFT")
    model = memwise.load(f"preset:{preset}")
    ids, mask = model.encode_batch([prompt])
    generated = model.generate(ids, n, mask, ignore_eos=True)[0, ids.shape[1]:].tolist()
    expected = model.tokenizer.decode(generated)
    # The last character may be incomplete: the stream holds it back, decode shows it as one U+FFFD.
    assert text == expected or text + "\ufffd" == expected
