"""Bad model files end in one MemwiseError that names what is wrong, never in another exception, a
hang, or a model loaded with the wrong weights: a table of hand-made faults, then a seeded fuzz of
safetensors headers and configs."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import signal
import struct
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest
import torch

import memwise
from memwise.checkpoint import CheckpointReader
from memwise.cli import main
from memwise.errors import CheckpointError, ConfigError, MemwiseError, SourceError, UnsupportedError
from memwise.info import describe
from memwise.models import hgrn_bit
from memwise.json_file import read_json
from memwise.memory_gate import OutOfMemoryError, check_fits, weights_bytes
from memwise.source import resolve_model

from hgrn_checkpoints import hgrn_config, write_hgrn_checkpoint
from tiny_models import build

PROMPT = [[3, 14, 15, 9, 2, 6]]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid tiny checkpoints of each family, built once; each test edits a copy."""
    root = tmp_path_factory.mktemp("originals")
    build("gpt2", root / "gpt2")
    build("llama", root / "llama")
    write_hgrn_checkpoint(root / "hgrn", hgrn_config(64, 2, 97))
    return {name: root / name for name in ("gpt2", "llama", "hgrn")}


def copy_of(originals: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(originals[name], tmp_path / name))


def edit_config(directory: Path, **fields: Any) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / "model.safetensors"
    header, data = read_header(path)
    edit(header)
    write_header(path, header, data)


def first_float_matrix(header: dict) -> str:
    return next(name for name, entry in header.items() if name != "__metadata__" and len(entry["shape"]) == 2)


class Hang(Exception):
    pass


@contextmanager
def answers_within(seconds: int) -> Iterator[None]:
    """Raise Hang in the test's thread if the block takes longer: a hang fails the test, not CI."""
    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- hand-made faults: (family, edit of the copy, error class, message) --------------------------

def _relabel_int(header: dict) -> None:
    header[first_float_matrix(header)]["dtype"] = "I32" if header[first_float_matrix(header)]["dtype"] == "F32" else "I16"


def _negative_offset(header: dict) -> None:
    entry = header[first_float_matrix(header)]
    entry["data_offsets"] = [-8, entry["data_offsets"][1] - 8]


def _non_utf8(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(b'{"model_type": "\xff\xfe"}')


CASES = [
    # Bad 1: an absurd layer count is refused at once (it used to hang building 10^9 layers).
    ("gpt2", lambda d: edit_config(d, n_layer=10**9), CheckpointError, r"config.json: says 1000000000 layers, but the checkpoint in .*gpt2 holds 2"),
    ("llama", lambda d: edit_config(d, num_hidden_layers=10**9), CheckpointError, "says 1000000000 layers"),
    ("hgrn", lambda d: edit_config(d, num_hidden_layers=10**9), CheckpointError, "says 1000000000 layers"),
    # Bad 3: a float tensor relabelled as integers would load as huge values.
    ("gpt2", lambda d: edit_header(d, _relabel_int), CheckpointError, "a weight must be a floating-point tensor"),
    ("llama", lambda d: edit_header(d, _relabel_int), CheckpointError, "a weight must be a floating-point tensor"),
    # Bad 4: a config with fewer layers than the checkpoint would run a truncated model.
    ("gpt2", lambda d: edit_config(d, n_layer=1), CheckpointError, r"holds layer\(s\) 1 that .* does not use"),
    ("llama", lambda d: edit_config(d, num_hidden_layers=1), CheckpointError, r"holds layer\(s\) 1 that"),
    # Sizes beyond the machine are refused before allocating, with both numbers.
    ("gpt2", lambda d: edit_config(d, n_embd=2**20, n_head=2**10), OutOfMemoryError, r"needs .*TiB.*available"),
    # Config fields of the wrong type or value.
    ("llama", lambda d: edit_config(d, model_type=["llama"]), UnsupportedError, r"model_type \['llama'\] is not supported"),
    ("llama", lambda d: edit_config(d, eos_token_id="2"), ConfigError, "'eos_token_id' should be a token id"),
    ("gpt2", lambda d: edit_config(d, bos_token_id=1.5), ConfigError, "'bos_token_id' should be int"),
    ("hgrn", lambda d: edit_config(d, pad_token_id=-1), ConfigError, r"'pad_token_id' should be a token id \(>= 0\)"),
    ("llama", lambda d: edit_config(d, rms_norm_eps=float("nan")), ConfigError, "'rms_norm_eps' should be a finite"),
    ("gpt2", lambda d: edit_config(d, layer_norm_epsilon=0), ConfigError, "epsilon must be > 0"),
    # Files that are not UTF-8 text.
    ("llama", _non_utf8("config.json"), ConfigError, "config.json: not UTF-8 text"),
    ("gpt2", _non_utf8("tokenizer_config.json"), CheckpointError, "tokenizer_config.json: not UTF-8 text"),
    # The header as the format specifies it.
    ("llama", lambda d: edit_header(d, _negative_offset), CheckpointError, r"data_offsets \[-8, .* is not \[begin, end\]"),
    ("hgrn", lambda d: edit_header(d, lambda h: h.update(__metadata__={"format": 1})), CheckpointError,
     "__metadata__ is .* expected an object of strings"),
]


@pytest.mark.parametrize("family,edit,error,message", CASES)
def test_a_bad_file_is_one_clear_error(originals, tmp_path, capsys, family, edit, error, message) -> None:
    directory = copy_of(originals, family, tmp_path)
    edit(directory)
    with pytest.raises(error, match=message), answers_within(20):
        memwise.load(str(directory))
    # The same through the command line: one line, exit 1, nothing written anywhere.
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    with answers_within(20):
        status = main(["generate", str(directory), "--prompt", "hello", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and err[0].startswith("memwise: error: "), err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("preset", ["tiny-mmfree", "tiny-llama", "tiny-gpt2"])
def test_sizes_of_an_absurd_layer_count_are_counted_not_walked(preset) -> None:
    # `memwise info` and the memory gate must answer for 10^9 layers at once; the closed form must
    # agree with walking the layout of 1 and 2 layers.
    resolved = resolve_model(f"preset:{preset}")
    family, spec = resolved.family, resolved.spec
    walked = {n: sum(math.prod(getattr(t, "shape")) for t in _layout(family, dataclasses.replace(spec, num_layers=n)))
              for n in (1, 2)}
    huge = dataclasses.replace(spec, num_layers=10**9)
    assert family.parameter_count(huge) == walked[1] + (10**9 - 1) * (walked[2] - walked[1])
    with pytest.raises(OutOfMemoryError, match=r"loading needs .* TiB .*available"):
        check_fits("loading", {"weights": weights_bytes(family, huge, torch.float32)}, torch.device("cpu"))


def _layout(family, spec):
    return family.checkpoint_layout(spec) if hasattr(family, "checkpoint_layout") else family.checkpoint_plan(spec)


def test_info_on_an_absurd_layer_count_answers(tmp_path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(hgrn_config(64, 10**9, 97)))
    with answers_within(20):    # it used to hang, walking 10^9 layers
        table = describe(str(tmp_path / "m"), None)
    assert f"{hgrn_bit.parameter_count(resolve_model(str(tmp_path / 'm')).spec):,}" in str(table.columns[1]._cells)


@pytest.mark.parametrize("source,message", [("", "the model source is empty"), ("  ", "empty"),
                                            (None, "should be a path, a hub id or preset:NAME"),
                                            (3, "found 3")])
def test_a_source_that_is_not_one_is_named(source, message) -> None:
    with pytest.raises(SourceError, match=message):
        memwise.load(source)


def test_an_unreadable_json_file_is_one_line(tmp_path) -> None:
    with pytest.raises(MemwiseError, match="cannot read"):
        read_json(tmp_path)     # a directory: the OSError path, as for a file without read permission


def test_a_legacy_pytorch_bin_loads(originals, tmp_path) -> None:
    # torch.save's format before 1.6 (not a zip archive) cannot be memory-mapped: it is read whole.
    directory = copy_of(originals, "gpt2", tmp_path)
    reader = CheckpointReader(directory)
    state = {name: reader.read(name) for name in reader.names()}
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    expected = memwise.load(str(originals["gpt2"])).logits(PROMPT)
    assert torch.equal(memwise.load(str(directory)).logits(PROMPT), expected)


def test_a_tensor_in_two_shards_is_refused(originals, tmp_path) -> None:
    directory = copy_of(originals, "llama", tmp_path)
    shutil.copyfile(directory / "model.safetensors", directory / "b.safetensors")
    (directory / "model.safetensors").rename(directory / "a.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors",
                                                                                       "y": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"b.safetensors: tensor '.*' is also in a.safetensors"):
        memwise.load(str(directory))


def test_a_shard_outside_the_directory_is_refused(originals, tmp_path) -> None:
    directory = copy_of(originals, "llama", tmp_path)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="is not a file name in this directory"):
        memwise.load(str(directory))


# ---- the fuzz: a few hundred seeded mutations of a valid header and config ---------------------

ODD_VALUES = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 10**30, 1.5, -0.0, float("nan"), float("inf"), "",
              "F32", "I8", "x" * 300, [], [0], [-1, 4], [0, 2**64], {}, {"a": 1}]


def mutate_header(header: dict, rng: random.Random) -> None:
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    kind = rng.randrange(6)
    if kind == 0:       # one field of one entry replaced by an odd value
        header[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(ODD_VALUES)
    elif kind == 1:     # a field dropped
        del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 2:     # an offset nudged
        begin, end = header[name]["data_offsets"]
        delta = rng.choice([-8, -4, -1, 1, 4, 8])
        header[name]["data_offsets"] = [begin + delta, end + rng.choice([0, delta])]
    elif kind == 3:     # a shape dimension changed
        shape = list(header[name]["shape"])
        if shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, -2, shape[0] * 2])
        header[name]["shape"] = shape
    elif kind == 4:     # two entries on the same bytes, or an entry renamed
        other = rng.choice(names)
        if rng.random() < 0.5:
            header[name]["data_offsets"] = list(header[other]["data_offsets"])
        else:
            header[other + ".x" if rng.random() < 0.5 else "model.layers.7.extra"] = header.pop(name)
    else:               # the metadata or a whole entry replaced
        header[rng.choice(["__metadata__", name])] = rng.choice(ODD_VALUES)


def mutate_config(config: dict, rng: random.Random) -> None:
    key = rng.choice(sorted(config))
    if rng.random() < 0.2:
        del config[key]
    else:
        value = config[key]
        choices = ODD_VALUES + ([value * 2, value + 1, value - 1, -value] if isinstance(value, (int, float))
                                and not isinstance(value, bool) else [])
        config[key] = rng.choice(choices)



@pytest.mark.parametrize("family", ["llama", "hgrn"])
def test_fuzzed_headers_and_configs_load_correctly_or_fail_clearly(originals, tmp_path, family) -> None:
    rng = random.Random(23)
    original = originals[family]
    expected = memwise.load(str(original)).logits(PROMPT)
    header, data = read_header(original / "model.safetensors")
    config = json.loads((original / "config.json").read_text())
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(150):
        directory = tmp_path / f"case{case}"
        shutil.copytree(original, directory)
        mutated_header, mutated_config = json.loads(json.dumps(header)), dict(config)
        on_header = case % 2 == 0
        if on_header:
            mutate_header(mutated_header, rng)
            write_header(directory / "model.safetensors", mutated_header, data)
        else:
            mutate_config(mutated_config, rng)
            (directory / "config.json").write_text(json.dumps(mutated_config))
        try:
            with answers_within(20):
                model = memwise.load(str(directory))
                logits = model.logits(PROMPT) if model.spec.vocab_size > max(PROMPT[0]) else None
        except MemwiseError:
            outcomes["refused"] += 1
            continue
        finally:
            shutil.rmtree(directory)
        outcomes["loaded"] += 1
        # A header mutation that still loads must load the same weights (no silent aliasing).
        if on_header:
            assert torch.equal(logits, expected), (case, mutated_header)
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 5, outcomes
