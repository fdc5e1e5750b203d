"""Bad input to the Python API and to `memwise generate` ends in one MemwiseError that names the
argument, what was found and what is expected: never a raw torch error, never a silent truncation."""
from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import memwise
from memwise.cli import main as cli_main
from memwise.errors import MemwiseError

PROMPT = [[3, 9, 27, 17]]


@pytest.fixture(scope="module")
def gpt2():
    """Learned positions (256 of them), vocabulary 512."""
    return memwise.load("preset:tiny-gpt2")


@pytest.fixture(scope="module")
def llama():
    """Rotary positions, trained on 2048."""
    return memwise.load("preset:tiny-llama")


# ---- token ids -----------------------------------------------------------------------------------

BAD_IDS = [
    ("hello", r"input_ids must be int token ids.*'hello' \(str\).*encode_batch"),
    (b"hello", r"input_ids.*\(bytes\)"),
    (None, r"input_ids.*None \(NoneType\)"),
    (5, r"input_ids.*5 \(int\)"),
    ({"ids": [1]}, r"input_ids.*\(dict\)"),
    ([], r"input_ids.*\[\] \(list\)"),
    ([[]], r"input_ids\[0\] is empty"),
    ([[1, 2], []], r"input_ids\[1\] is empty"),
    ([[1, 2], 3], r"input_ids\[1\] must be a list of int token ids, got 3 \(int\)"),
    ([1.0, 2.0], r"input_ids\[0\] must be an int token id, got 1.0 \(float\)"),
    ([[1.0, 2.5]], r"input_ids\[0\]\[0\] must be an int token id, got 1.0 \(float\)"),
    ([[1, 2.5]], r"input_ids\[0\]\[1\] must be an int token id, got 2.5 \(float\)"),
    ([[True, 2]], r"input_ids\[0\]\[0\] must be an int token id, got True \(bool\)"),
    ([True, False], r"input_ids\[0\] .*True \(bool\)"),
    ([["1", "2"]], r"input_ids\[0\]\[0\] .*'1' \(str\)"),
    ([torch.tensor([[1, 2]])], r"input_ids\[0\] must be a 1-D row"),
    (np.array([[1.0, 2.0]]), r"input_ids must be int token ids.*numpy array of float64"),
    (np.array([[True, False]]), r"input_ids.*numpy array of bool"),
    (torch.tensor([[1.0, 2.0]]), r"input_ids must be int token ids.*tensor of torch.float32"),
    (torch.tensor([[1, 0]], dtype=torch.bool), r"input_ids.*tensor of torch.bool"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"input_ids must be \[batch, tokens\].*shape \(1, 2, 3\)"),
    (torch.zeros(0, 3, dtype=torch.long), r"input_ids must be \[batch, tokens\].*shape \(0, 3\)"),
    (torch.zeros(1, 0, dtype=torch.long), r"input_ids must be \[batch, tokens\].*shape \(1, 0\)"),
    (torch.tensor(3), r"input_ids must be \[batch, tokens\].*shape \(\)"),
    ([[1, 512]], r"input_ids: token id 512 is outside the vocabulary \[0, 512\)"),
    (np.array([[-1, 2]]), r"input_ids: token id -1 is outside the vocabulary"),
]

CALLS = {
    "logits": lambda model, ids: model.logits(ids),
    "generate": lambda model, ids: model.generate(ids, max_new_tokens=2),
    "stream": lambda model, ids: model.stream(ids, max_new_tokens=2),     # refused before the first step
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("ids,message", BAD_IDS, ids=[repr(b[0])[:30] for b in BAD_IDS])
def test_bad_input_ids_are_refused(gpt2, call, ids, message):
    with pytest.raises(MemwiseError, match=message):
        CALLS[call](gpt2, ids)


@pytest.mark.parametrize("ids", [
    np.array(PROMPT), np.array(PROMPT, dtype=np.int32), np.array(PROMPT, dtype=np.uint16), np.array(PROMPT[0]),
    torch.tensor(PROMPT, dtype=torch.int8), torch.tensor(PROMPT[0]), [np.int64(t) for t in PROMPT[0]],
    PROMPT[0], tuple(PROMPT[0]), [torch.tensor(PROMPT[0])],
], ids=repr)
def test_integer_ids_of_any_container_are_accepted(gpt2, ids):
    assert torch.equal(gpt2.logits(ids), gpt2.logits(torch.tensor(PROMPT)))


def test_ragged_rows_are_left_padded_unless_a_mask_is_given(gpt2):
    rows = [[3, 9, 27, 17], [5, 44]]
    padded = torch.tensor([[3, 9, 27, 17], [gpt2.pad_token_id] * 2 + [5, 44]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(gpt2.generate(rows, max_new_tokens=2, ignore_eos=True),
                       gpt2.generate(padded, max_new_tokens=2, attention_mask=mask, ignore_eos=True))
    with pytest.raises(MemwiseError, match=r"input_ids rows have different lengths \[2, 4\]"):
        gpt2.generate(rows, max_new_tokens=2, attention_mask=mask)


@pytest.mark.parametrize("mask,message", [
    ([[1, 1, 1, 2]], "attention_mask must hold only 0 and 1"),
    (torch.ones(1, 4), r"attention_mask must be 0/1 ints or bools, got a tensor of torch.float32"),
    ("1111", r"attention_mask must be 0/1 ints or bools, got '1111' \(str\)"),
    ([[1, 1], [1]], "attention_mask must be a rectangular array"),
    ([[1, 1]], r"attention_mask shape \(1, 2\) differs from input_ids \(1, 4\)"),
])
def test_bad_attention_masks_are_refused(gpt2, mask, message):
    with pytest.raises(MemwiseError, match=message):
        gpt2.logits(torch.tensor(PROMPT), attention_mask=mask)


def test_a_list_or_1d_attention_mask_is_accepted(gpt2):
    expected = gpt2.logits(torch.tensor(PROMPT))
    assert torch.equal(gpt2.logits(torch.tensor(PROMPT), attention_mask=[[1, 1, 1, 1]]), expected)
    assert torch.equal(gpt2.logits(PROMPT[0], attention_mask=np.ones(4, dtype=bool)), expected)


# ---- generation options --------------------------------------------------------------------------

SAMPLE = {"do_sample": True}
BAD_OPTIONS = [
    ({"max_new_tokens": "4"}, r"max_new_tokens must be an int >= 1, got '4' \(str\)"),
    ({"max_new_tokens": 3.0}, r"max_new_tokens must be an int >= 1, got 3.0 \(float\)"),
    ({"max_new_tokens": True}, r"max_new_tokens .*True \(bool\)"),
    ({"max_new_tokens": -1}, r"max_new_tokens must be an int >= 1, got -1"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an int >= 1, got 0"),
    ({"max_new_tokens": None}, r"max_new_tokens .*None"),
    ({**SAMPLE, "temperature": "1"}, r"temperature \(when sampling\) must be a finite number > 0, got '1'"),
    ({**SAMPLE, "temperature": math.nan}, r"temperature .*got nan"),
    ({**SAMPLE, "temperature": math.inf}, r"temperature .*got inf"),
    ({**SAMPLE, "temperature": 0.0}, r"temperature \(when sampling\) must be a finite number > 0, got 0.0"),
    ({"temperature": math.nan}, r"temperature must be a finite number >= 0, got nan"),
    ({"temperature": -1.0}, r"temperature must be a finite number >= 0, got -1.0"),
    ({"temperature": "hot"}, r"temperature .*'hot' \(str\)"),
    ({**SAMPLE, "top_p": "0.9"}, r"top_p must be a number in \(0, 1\], got '0.9' \(str\)"),
    ({**SAMPLE, "top_p": math.nan}, r"top_p .*got nan"),
    ({**SAMPLE, "top_p": math.inf}, r"top_p .*got inf"),
    ({**SAMPLE, "top_p": 0.0}, r"top_p .*got 0.0"),
    ({**SAMPLE, "top_p": 1.5}, r"top_p .*got 1.5"),
    ({"repetition_penalty": "1.2"}, r"repetition_penalty must be a finite number > 0, got '1.2'"),
    ({"repetition_penalty": math.nan}, r"repetition_penalty .*got nan"),
    ({"repetition_penalty": math.inf}, r"repetition_penalty .*got inf"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty .*got 0.0"),
    ({"repetition_penalty": True}, r"repetition_penalty .*True \(bool\)"),
    ({**SAMPLE, "top_k": 2.0}, r"top_k must be an int >= 1, got 2.0 \(float\)"),
    ({**SAMPLE, "top_k": True}, r"top_k .*True \(bool\)"),
    ({**SAMPLE, "top_k": "5"}, r"top_k .*'5' \(str\)"),
    ({**SAMPLE, "top_k": 0}, r"top_k must be an int >= 1, got 0"),
    ({"no_repeat_ngram_size": 2.0}, r"no_repeat_ngram_size must be an int >= 0, got 2.0 \(float\)"),
    ({"no_repeat_ngram_size": True}, r"no_repeat_ngram_size .*True \(bool\)"),
    ({"no_repeat_ngram_size": -1}, r"no_repeat_ngram_size .*got -1"),
    ({"min_new_tokens": 1.5}, r"min_new_tokens must be an int >= 0, got 1.5 \(float\)"),
    ({"min_new_tokens": False}, r"min_new_tokens .*False \(bool\)"),
    ({"min_new_tokens": -2}, r"min_new_tokens .*got -2"),
    ({**SAMPLE, "seed": -1}, r"seed must be an int in \[0, 18446744073709551615\], got -1"),
    ({**SAMPLE, "seed": 2**64}, r"seed must be an int in \[0, 18446744073709551615\], got 18446744073709551616"),
    ({**SAMPLE, "seed": 1.5}, r"seed .*1.5 \(float\)"),
    ({**SAMPLE, "seed": "7"}, r"seed .*'7' \(str\)"),
    ({**SAMPLE, "seed": True}, r"seed .*True \(bool\)"),
    ({"do_sample": 1}, r"do_sample must be True or False, got 1 \(int\)"),
    ({"do_sample": "yes"}, r"do_sample .*'yes' \(str\)"),
    ({"do_sample": None}, r"do_sample .*None"),
    ({"ignore_eos": 0}, r"ignore_eos must be True or False, got 0 \(int\)"),
    ({"ignore_eos": "no"}, r"ignore_eos .*'no' \(str\)"),
    ({"stop_strings": ""}, r"stop_strings must be a str or a list of non-empty str, got item '' \(str\)"),
    ({"stop_strings": ["ok", ""]}, r"stop_strings .*got item ''"),
    ({"stop_strings": [1]}, r"stop_strings .*got item 1 \(int\)"),
    ({"stop_strings": ["ok", None]}, r"stop_strings .*got item None"),
    ({"stop_strings": 5}, r"stop_strings must be a str or a list of non-empty str, got 5 \(int\)"),
    ({"stop_strings": b"\n"}, r"stop_strings .*\(bytes\)"),
    ({"nucleus": 0.9}, r"unknown generation option\(s\): nucleus"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[repr(b[0])[:40] for b in BAD_OPTIONS])
def test_bad_generation_options_are_refused(gpt2, options, message):
    options = {"max_new_tokens": 4, **options}
    with pytest.raises(MemwiseError, match=message):
        gpt2.stream(PROMPT, **options)      # refused before the first step, not on it
    with pytest.raises(MemwiseError, match=message):
        gpt2.generate(PROMPT, **options)


@pytest.mark.parametrize("options", [
    {"max_new_tokens": np.int64(3)},
    {"temperature": 0.0},                   # greedy: the temperature is unused
    {"temperature": 0},
    {**SAMPLE, "temperature": np.float32(0.7), "top_p": 1, "top_k": np.int32(5)},
    {**SAMPLE, "seed": 0}, {**SAMPLE, "seed": 2**64 - 1},
    {"repetition_penalty": 2}, {"stop_strings": None}, {"stop_strings": ("a", "b")}, {"stop_strings": {"zz"}},
], ids=repr)
def test_good_generation_options_are_accepted(gpt2, options):
    options = {"max_new_tokens": 3, "ignore_eos": True, **options}
    assert gpt2.generate(PROMPT, **options).shape == (1, len(PROMPT[0]) + 3)


# ---- prompts as text -----------------------------------------------------------------------------

@pytest.mark.parametrize("call,message", [
    (lambda m: m.encode_batch(None), r"prompts must be a non-empty list of str, got None \(NoneType\)"),
    (lambda m: m.encode_batch("a string"), r"prompts must be a list of str, got one str 'a string' \(str\); pass \[text\]"),
    (lambda m: m.encode_batch([]), r"prompts must be a non-empty list of str, got \[\]"),
    (lambda m: m.encode_batch(["a", 3]), r"prompts\[1\] must be a str, got 3 \(int\)"),
    (lambda m: m.encode_batch([b"a"]), r"prompts\[0\] must be a str, got b'a' \(bytes\)"),
    (lambda m: m.generate_text(None), r"prompt must be a str, got None \(NoneType\)"),
    (lambda m: m.generate_text(123), r"prompt must be a str, got 123 \(int\)"),
    (lambda m: m.generate_text(["a", "b"]), r"prompt must be a str, got \['a', 'b'\] \(list\); .*encode_batch"),
    (lambda m: m.generate_text("hi", max_new_tokens=2.0), r"max_new_tokens must be an int >= 1, got 2.0"),
    (lambda m: m.generate_text("hi", stop_strings=""), r"stop_strings .*got item ''"),
], ids=["encode None", "encode str", "encode []", "encode int item", "encode bytes item", "text None",
        "text int", "text list", "text float count", "text empty stop"])
def test_bad_prompts_are_refused(gpt2, call, message):
    with pytest.raises(MemwiseError, match=message):
        call(gpt2)


# ---- context length ------------------------------------------------------------------------------

def test_rotary_model_past_its_training_context_runs_with_one_warning(llama):
    assert llama.spec.positions == "rotary" and llama.spec.max_positions == 2048
    prompt = torch.randint(0, llama.spec.vocab_size, (1, 2046), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = llama.generate(prompt, max_new_tokens=4, ignore_eos=True)
    assert out.shape == (1, 2050)
    assert [str(w.message) for w in caught if w.category is UserWarning] == [
        "2050 tokens (prompt + new tokens): the context length exceeds this llama model's training context of "
        "2048 positions; expect degraded output past it"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llama.generate(prompt, max_new_tokens=2, ignore_eos=True)       # 2048: within the context


def test_learned_positions_past_the_table_stay_an_error(gpt2):
    with pytest.raises(MemwiseError, match=r"260 tokens exceed this model's 256 positions"):
        gpt2.generate([[1] * 250], max_new_tokens=10)


# ---- the command line ----------------------------------------------------------------------------
# In-process through memwise.cli.main (a subprocess per case would take seconds each); the last test
# runs one case as a user does, to check the real exit status and the single line on stderr.

@pytest.mark.parametrize("flags,status,message", [
    (["--threads", "0"], 2, "memwise generate: error: argument --threads: must be an integer >= 1, got '0'"),
    (["--threads", "-3"], 2, "argument --threads: must be an integer >= 1, got '-3'"),
    (["--threads", "two"], 2, "argument --threads: must be an integer >= 1, got 'two'"),
    (["--max-new-tokens", "0"], 1, "memwise: error: max_new_tokens must be an int >= 1, got 0 (int)"),
    (["--max-new-tokens", "-5"], 1, "max_new_tokens must be an int >= 1, got -5"),
    (["--max-new-tokens", "3.5"], 2, "argument --max-new-tokens: invalid int value: '3.5'"),
    (["--sample", "--temperature", "nan"], 1, "temperature (when sampling) must be a finite number > 0, got nan"),
    (["--sample", "--temperature", "0"], 1, "temperature (when sampling) must be a finite number > 0, got 0.0"),
    (["--sample", "--top-p", "inf"], 1, "top_p must be a number in (0, 1], got inf"),
    (["--sample", "--top-k", "0"], 1, "top_k must be an int >= 1, got 0"),
    (["--sample", "--seed", "-1"], 1, "seed must be an int in [0, 18446744073709551615], got -1"),
    (["--repetition-penalty", "inf"], 1, "repetition_penalty must be a finite number > 0, got inf"),
    (["--no-repeat-ngram-size", "-1"], 1, "no_repeat_ngram_size must be an int >= 0, got -1"),
    (["--stop", ""], 1, "stop_strings must be a str or a list of non-empty str, got item '' (str)"),
])
def test_cli_generate_flags_are_checked(capsys, flags, status, message):
    argv = ["generate", "preset:tiny-gpt2", "--prompt", "hi", *flags]
    try:
        code = cli_main(argv)
    except SystemExit as stop:       # argparse's usage errors exit from inside parse_args
        code = stop.code
    err = capsys.readouterr().err
    assert code == status
    assert message in err and err.strip().count("\n") == 0, err


def test_cli_bad_threads_as_a_user_sees_it():
    run = subprocess.run([sys.executable, "-m", "memwise.cli", "generate", "preset:tiny-gpt2", "--prompt", "hi",
                          "--threads", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == "memwise generate: error: argument --threads: must be an integer >= 1, got '0'\n"
