"""Bad input to offloaded loads: one clear MemwiseError each, nothing half-written, nothing of the
user's deleted; damaged or out-of-date memwise files of the same model are rebuilt."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memwise
from memwise.errors import MemwiseError, UnsupportedError
from memwise.offload import OffloadError
from tiny_models import one_thread  # noqa: F401 (one_thread: autouse fixture)

SOURCE = "preset:tiny-llama"
PROMPT = torch.tensor([[5, 17, 3, 44, 9]])
ROOT = Path(__file__).resolve().parents[1]


def offloaded(directory: Path, source: str = SOURCE, **options) -> memwise.LanguageModel:
    return memwise.load(source, max_memory="64GiB", offload_dir=directory, **options)


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return memwise.load(SOURCE).logits(PROMPT)


def test_budget_below_one_layer_says_the_minimum(tmp_path):
    with pytest.raises(OffloadError, match=r"max_memory 1\.0 MiB is below what preset:tiny-llama needs to "
                                           r"stream: [0-9.]+ MiB \(one layer"):
        memwise.load(SOURCE, max_memory="1MiB", offload_dir=tmp_path / "off")
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("options, message", [
    ({"max_memory": "2GiB"}, "max_memory was given without offload_dir"),
    ({"offload_dir": "/tmp"}, "offload_dir was given without max_memory"),
    ({"max_memory": "2 parsecs", "offload_dir": "/tmp"}, "max_memory '2 parsecs': not an amount of memory"),
    ({"max_memory": "0GiB", "offload_dir": "/tmp"}, "should be at least one byte"),
])
def test_incomplete_or_malformed_requests(options, message):
    with pytest.raises(OffloadError, match=message):
        memwise.load(SOURCE, **options)


def test_other_families_are_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="offloading supports the decoder family"):
        memwise.load("preset:tiny-mmfree", max_memory="1GiB", offload_dir=tmp_path)


def test_offload_dir_that_cannot_be_a_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    with pytest.raises(OffloadError, match=r"offload_dir .*file/sub: cannot be created"):
        offloaded(blocker / "sub")
    with pytest.raises(OffloadError, match=r"offload_dir .*file: not a directory"):
        offloaded(blocker)
    assert blocker.read_text() == "mine"


def test_offload_dir_without_room_for_the_file(tmp_path, monkeypatch):
    import shutil
    from memwise.offload import files
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(OffloadError, match=r"4\.0 KiB free, the offload file of preset:tiny-llama needs [0-9.]+ KiB"):
        offloaded(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_file_is_refused_and_kept(tmp_path):
    path = offloaded(tmp_path).module.offload.path
    path.write_bytes(b"someone else's data" * 100)
    with pytest.raises(OffloadError, match="not a memwise offload file"):
        offloaded(tmp_path)
    assert path.read_bytes() == b"someone else's data" * 100


def test_a_file_of_another_model_is_refused_and_kept(tmp_path):
    ours = offloaded(tmp_path).module.offload.path
    other = offloaded(tmp_path, "preset:tiny-gpt2").module.offload.path
    os.replace(other, ours)
    kept = ours.read_bytes()
    with pytest.raises(OffloadError, match="holds another model"):
        offloaded(tmp_path)
    assert ours.read_bytes() == kept


def test_a_file_from_a_newer_memwise_is_refused(tmp_path):
    path = offloaded(tmp_path).module.offload.path
    data = bytearray(path.read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(OffloadError, match="format 99 is newer"):
        offloaded(tmp_path)


def _damage(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p, h: _damage(p, h.layers[1].offset + 10), "checksum mismatch in layer 1"),
    (lambda p, h: _damage(p, h.rest.offset + 3), "checksum mismatch in the non-layer weights"),
    (lambda p, h: _damage(p, 30), "header checksum mismatch"),
    (lambda p, h: os.truncate(p, h.rest.offset), "bytes, its header says"),
    (lambda p, h: _set_version(p, 0), "format 0 is older"),
])
def test_a_damaged_or_old_file_of_this_model_is_rebuilt(tmp_path, reference, damage, message):
    from memwise.offload.store import read_header
    model = offloaded(tmp_path)
    path = model.module.offload.path
    header = read_header(path, _expect(path))
    damage(path, header)
    with pytest.warns(UserWarning, match=f"{message}.*; rebuilding it"):
        rebuilt = offloaded(tmp_path)
    assert torch.equal(rebuilt.logits(PROMPT), reference)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        offloaded(tmp_path)      # valid again: no warning


def _set_version(path: Path, version: int) -> None:
    data = bytearray(path.read_bytes())
    data[8:12] = version.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _expect(path: Path):
    from memwise.offload.store import StoreHeader
    raw = path.read_bytes()
    return StoreHeader.from_json(raw[20:20 + int.from_bytes(raw[12:16], "little")])


def _run_writer(directory: Path, limit_bytes: int, killed: bool) -> subprocess.CompletedProcess:
    """A child that writes the offload file of preset:tiny-llama with its files limited to
    `limit_bytes` (RLIMIT_FSIZE): the write fails midway with EFBIG, or, with SIGXFSZ at its default
    action, the kernel kills the child there."""
    code = textwrap.dedent(f"""
        import resource, signal, memwise
        if {killed}:
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))
        memwise.load("{SOURCE}", max_memory="64GiB", offload_dir="{directory}")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("killed", [False, True])
def test_a_write_stopped_midway_leaves_no_valid_looking_file(tmp_path, reference, killed):
    size = offloaded(tmp_path / "full").module.offload.path.stat().st_size
    directory = tmp_path / "off"
    directory.mkdir()
    result = _run_writer(directory, size // 2, killed)
    if killed:
        assert result.returncode == -25, result.stderr      # SIGXFSZ
        assert [p.name.rsplit(".tmp-", 1)[0].endswith(".mwoff") for p in directory.iterdir()] == [True]
    else:
        assert result.returncode != 0 and "File too large" in result.stderr
        assert list(directory.iterdir()) == []
    assert not any(p.suffix == ".mwoff" for p in directory.iterdir())
    model = offloaded(directory)       # rebuilds, and removes what the killed writer left
    assert [p.name for p in directory.iterdir()] == [model.module.offload.path.name]
    assert torch.equal(model.logits(PROMPT), reference)


def test_errors_are_memwise_errors():
    assert issubclass(OffloadError, MemwiseError)
