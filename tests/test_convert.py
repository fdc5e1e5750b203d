"""memwise convert: packed checkpoints load to identical logits, re-conversion is a no-op, and a failed
conversion leaves nothing behind (nor does a stop signal; what SIGKILL leaves, the next run removes)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import memwise
from memwise.checkpoint import CheckpointReader
from memwise.convert import convert
from memwise.errors import CheckpointError, MemwiseError, SourceError, UnsupportedError
from memwise.kernels.packed import pack_ternary, padded_cols, quantize_latent

from hgrn_checkpoints import hgrn_config, write_hgrn_checkpoint


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    path = tmp_path_factory.mktemp("latent")
    config = hgrn_config(96, 3, 203, intermediate_size=200)
    tensors = write_hgrn_checkpoint(path, config, seed=7)
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    return path, config, tensors


@pytest.fixture(scope="module")
def packed(latent, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "packed"
    assert convert(str(latent[0]), out, progress=False) == out
    return out


def logits(path, ids):
    model = memwise.load(str(path))
    model.module.backend = "reference"
    return model.logits(ids)


def test_packed_checkpoint_gives_identical_logits(latent, packed):
    ids = torch.randint(0, 203, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(packed, ids), logits(latent[0], ids))


def test_packed_file_layout(latent, packed):
    path, config, tensors = latent
    with safe_open(str(packed / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "memwise-ternary", "format_version": "1"}
    stored = load_file(str(packed / "model.safetensors"))    # a standard safetensors file
    name = "model.layers.2.mlp.down_proj.weight"
    t, m = quantize_latent(tensors[name])
    assert stored[name + ".packed"].dtype == torch.uint8
    assert stored[name + ".packed"].shape == (96, padded_cols(200) // 4)
    assert torch.equal(stored[name + ".packed"], pack_ternary(t))
    assert stored[name + ".scale"].dtype == torch.float32 and stored[name + ".scale"].shape == ()
    assert abs(float(stored[name + ".scale"]) - m) <= 1e-6 * m
    # Everything that is not a ternary matrix is kept as stored, bytes and dtype.
    for other in ("model.embeddings.weight", "model.lower_bounds", "model.layers.0.attn.g_norm.weight",
                  "lm_head.norm.weight"):
        assert stored[other].dtype == torch.bfloat16 and torch.equal(stored[other], tensors[other])
    assert not any(n.endswith(".weight") and n + ".packed" in stored for n in stored)
    ternary = [n for n in tensors if n.endswith("_proj.weight") or n == "lm_head.weight"]
    assert len(stored) == len(tensors) + len(ternary)
    # Tensors start at multiples of their element size.
    reader = CheckpointReader(packed)
    for entry in reader.entries.values():
        assert entry.offset % entry.dtype.itemsize == 0


def test_packed_is_much_smaller(latent, packed):
    latent_bytes = (latent[0] / "model.safetensors").stat().st_size
    packed_bytes = (packed / "model.safetensors").stat().st_size
    assert packed_bytes < latent_bytes / 2


def test_config_and_tokenizer_files(latent, packed):
    config = json.loads((packed / "config.json").read_text())
    assert config["memwise"]["format"] == "memwise-ternary" and config["memwise"]["format_version"] == 1
    assert {k: v for k, v in config.items() if k != "memwise"} == latent[1]
    assert (packed / "tokenizer_config.json").read_text() == '{"bos_token": "<s>"}'
    assert sorted(p.name for p in packed.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]


def test_converting_a_converted_model_changes_nothing(packed, tmp_path):
    again = convert(str(packed), tmp_path / "again", progress=False)
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (packed / name).read_bytes(), name


def test_conventional_model_is_refused(tmp_path):
    # The model type is refused from config.json alone, before any weights are read.
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16}))
    with pytest.raises(UnsupportedError, match="convert supports hgrn_bit .* model_type 'gpt2'"):
        convert(str(tmp_path / "gpt2"), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


@pytest.mark.parametrize("broken", ["missing", "shape"])
def test_bad_source_leaves_no_output(tmp_path, broken):
    name = "lm_head.norm.weight"   # the last tensor the layout lists
    if broken == "missing":
        write_hgrn_checkpoint(tmp_path / "src", hgrn_config(64, 2, 50), drop=(name,))
    else:
        write_hgrn_checkpoint(tmp_path / "src", hgrn_config(64, 2, 50),
                              replace={name: torch.ones(65, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=name):
        convert(str(tmp_path / "src"), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failure_while_writing_leaves_no_output(tmp_path):
    """A corrupt packed source is only found while copying; the partial output is removed."""
    write_hgrn_checkpoint(tmp_path / "src", hgrn_config(64, 2, 50))
    convert(str(tmp_path / "src"), tmp_path / "packed", progress=False)
    weights = tmp_path / "packed" / "model.safetensors"
    reader = CheckpointReader(tmp_path / "packed")
    entry = reader.entries["model.layers.1.mlp.down_proj.weight.packed"]
    data = bytearray(weights.read_bytes())
    data[entry.offset] = 0xFF     # code 3: not a ternary value
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="invalid 2-bit code 3"):
        convert(str(tmp_path / "packed"), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed", "src"]


def test_existing_output_is_not_touched(latent, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(MemwiseError, match="already exists"):
        convert(str(latent[0]), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep").read_text() == "x"


def test_preset_is_refused(tmp_path):
    with pytest.raises(SourceError, match="presets have random weights"):
        convert("preset:tiny-mmfree", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert(latent, tmp_path, capsys):
    from memwise.cli import main
    out = tmp_path / "cli"
    assert main(["convert", str(latent[0]), str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["convert", str(latent[0]), str(out)]) == 1      # a user mistake: one line, exit 1
    assert "already exists" in capsys.readouterr().err


# ---- partial directories: what a failed or killed conversion leaves, and who removes it -----------

def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()        # reaped: no process has this PID now (until the system reuses it)
    return child.pid


def test_stale_partials_are_removed_and_live_ones_kept(latent, tmp_path):
    limit = Path("/proc/sys/kernel/pid_max")
    pid_max = int(limit.read_text()) if limit.exists() else 2**22
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = [f".packed.partial-{dead_pid()}", f".packed.partial-{pid_max + 1}",
                 ".packed.partial-99999999999999999999"]
        kept = [f".packed.partial-{live.pid}", ".packed.partial-1",        # live: still converting
                f".other.partial-{dead_pid()}",                             # another OUT's
                ".packed.partial-0123", ".packed.partial-12x", ".packed.partial-"]   # names convert never makes
        for name in stale + kept:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"half")
        a_file = f".packed.partial-{dead_pid()}"
        (tmp_path / a_file).write_text("x")
        (tmp_path / "target").mkdir()
        (tmp_path / "target" / "keep").write_text("x")
        link = f".packed.partial-{dead_pid()}"          # only directories are removed, never through a link
        (tmp_path / link).symlink_to(tmp_path / "target")
        convert(str(latent[0]), tmp_path / "packed", progress=False)
    finally:
        live.kill()
        live.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(kept + [a_file, link, "packed", "target"])
    assert (tmp_path / "target" / "keep").read_text() == "x"


def test_disk_full_while_writing_is_one_error_and_leaves_nothing(latent, tmp_path, monkeypatch):
    def write_packed(spec, reader, config, out, progress):
        (out / "model.safetensors").write_bytes(b"part of it")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("memwise.models.hgrn_bit.write_packed", write_packed)
    out = tmp_path / "packed"
    with pytest.raises(MemwiseError, match=f"^{re.escape(str(out))}: cannot write the converted "
                                           "checkpoint: No space left on device$"):
        convert(str(latent[0]), out, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyboardInterrupt()])
def test_other_failures_pass_through_and_leave_nothing(latent, tmp_path, monkeypatch, error):
    def write_packed(spec, reader, config, out, progress):
        (out / "model.safetensors").write_bytes(b"part of it")
        raise error

    monkeypatch.setattr("memwise.models.hgrn_bit.write_packed", write_packed)
    with pytest.raises(type(error)):
        convert(str(latent[0]), tmp_path / "packed", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("theirs", ["directory", "file"])
def test_output_created_meanwhile_is_left_alone(latent, tmp_path, monkeypatch, theirs):
    rename = os.rename

    def racing_rename(src, dst):
        # someone else makes OUT just before ours is renamed into place
        if theirs == "directory":
            os.mkdir(dst)
            (Path(dst) / "keep").write_text("x")
        else:
            Path(dst).write_text("x")
        rename(src, dst)

    monkeypatch.setattr("memwise.convert.os.rename", racing_rename)
    out = tmp_path / "packed"
    reason = "Directory not empty" if theirs == "directory" else "Not a directory"
    with pytest.raises(MemwiseError, match=f"^{re.escape(str(out))}: cannot write the converted checkpoint: {reason}; "
                                           "something else created it"):
        convert(str(latent[0]), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]
    assert (out / "keep" if theirs == "directory" else out).read_text() == "x"


def test_unreadable_source_file_is_named(latent, tmp_path, monkeypatch):
    def copyfile(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))

    monkeypatch.setattr("memwise.convert.shutil.copyfile", copyfile)
    with pytest.raises(MemwiseError, match=f"^{re.escape(str(latent[0] / 'tokenizer_config.json'))}: Permission denied "
                                           r"\(while converting into "):
        convert(str(latent[0]), tmp_path / "packed", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def big_latent(tmp_path_factory):
    """~43 MB, so that writing takes long enough (a few tenths of a second at least) to be caught at it."""
    path = tmp_path_factory.mktemp("big")
    write_hgrn_checkpoint(path, hgrn_config(512, 6, 1000))
    return path


def convert_and_signal(source, out, sig):
    """Run `memwise convert` in a process of its own and send it `sig` once it is writing; its PID, exit
    status and stderr. Skips the test when the conversion finished before the signal could be sent."""
    child = subprocess.Popen([sys.executable, "-m", "memwise.cli", "convert", str(source), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = out.parent / f".{out.name}.partial-{child.pid}"
    deadline = time.monotonic() + 120
    while not partial.is_dir() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    if child.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    return child.pid, child.returncode, err


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_while_writing_leaves_nothing(big_latent, tmp_path):
    _, status, err = convert_and_signal(big_latent, tmp_path / "packed", signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigkill_leaves_a_partial_that_the_next_conversion_removes(big_latent, tmp_path):
    pid, status, err = convert_and_signal(big_latent, tmp_path / "packed", signal.SIGKILL)
    assert status == -signal.SIGKILL, err
    assert [p.name for p in tmp_path.iterdir()] == [f".packed.partial-{pid}"]
    convert(str(big_latent), tmp_path / "packed", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]
