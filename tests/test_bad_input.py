"""Bad input ends in one clear error, never in a silent wrong load: the safetensors header checks and
the command line's top level (unexpected errors, signals, a closed stdout)."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memwise.checkpoint import CheckpointReader
from memwise.errors import CheckpointError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize("entries,data,message", [
    # Two names on the same bytes would load as two equal weights.
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}}, 8, "'a' and 'b' overlap"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, 12, "overlap"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}}, 20,
     "a hole of 4 bytes before tensor 'b'"),
    ({"a": {**F32x2, "data_offsets": [8, 16]}}, 16, "a hole of 8 bytes before tensor 'a'"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}}, 12, "4 bytes after the last tensor"),
    ({"__metadata__": ["not", "an", "object"], "a": {**F32x2, "data_offsets": [0, 8]}}, 8,
     "__metadata__ is .* expected an object of strings"),
])
def test_safetensors_header_must_tile_the_data(tmp_path: Path, entries: dict, data: int, message: str) -> None:
    directory = write_safetensors(tmp_path / "m", entries, bytes(data))
    with pytest.raises(CheckpointError, match=message) as error:
        CheckpointReader(directory)
    assert "model.safetensors" in str(error.value)


def test_a_well_formed_file_in_any_entry_order_loads(tmp_path: Path) -> None:
    entries = {"b": {**F32x2, "data_offsets": [8, 16]}, "empty": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
               "a": {**F32x2, "data_offsets": [0, 8]}}
    reader = CheckpointReader(write_safetensors(tmp_path / "m", entries, struct.pack("<4f", 1, 2, 3, 4)))
    assert reader.read("a", (2,)).tolist() == [1.0, 2.0] and reader.read("b", (2,)).tolist() == [3.0, 4.0]


# ---- the command line's top level ---------------------------------------------------------------

RUN = """
import sys, time, argparse
from memwise.cli_support import run_command
def command(args):
    if args.what == "crash":
        raise RuntimeError("something unexpected")
    print("started", flush=True)
    time.sleep(30)
sys.exit(run_command(argparse.Namespace(func=command, what=sys.argv[1], debug=False)))
"""


def run_python(code: str, *args: str, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=environment, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")


def test_an_unexpected_error_is_one_line() -> None:
    out, err = run_python(RUN, "crash").communicate(timeout=60)
    assert err.strip().splitlines() == ["memwise: error: RuntimeError: something unexpected "
                                        "(MEMWISE_DEBUG=1 shows the traceback)"]
    process = run_python(RUN, "crash", MEMWISE_DEBUG="1")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" in err and "RuntimeError: something unexpected" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_stop_a_command_with_one_line_and_the_conventional_code(sig: signal.Signals) -> None:
    process = run_python(RUN, "sleep")
    assert process.stdout.readline().strip() == "started"
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + sig
    assert err.strip().splitlines() == [f"memwise: interrupted ({sig.name})"]


def test_a_closed_stdout_ends_quietly() -> None:
    # `memwise generate ... | head -c1`: the reader goes away while tokens are still being written.
    process = run_python("import sys; from memwise.cli import main; sys.exit(main())", "generate",
                         "preset:tiny-mmfree", "--prompt", "hello", "--max-new-tokens", "5000", "--ignore-eos")
    assert process.stdout.read(1)
    process.stdout.close()
    err = process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_ctrl_c_while_the_command_line_starts_is_one_line() -> None:
    # The parser is built while torch is imported: seconds in which a user may press Ctrl-C.
    code = ("import sys, memwise.cli as cli\n"
            "def interrupted_build():\n    raise KeyboardInterrupt\n"
            "cli.build_parser = interrupted_build\nsys.exit(cli.main(['info', 'preset:tiny-gpt2']))")
    process = run_python(code)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert err.strip().splitlines() == ["memwise: interrupted (SIGINT)"]


def test_a_warning_is_one_line() -> None:
    code = ("import sys, argparse, warnings\nfrom memwise.cli_support import run_command\n"
            "def command(args):\n    warnings.warn('past the training context')\n"
            "sys.exit(run_command(argparse.Namespace(func=command, debug=False)))")
    process = run_python(code)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0
    assert err.strip().splitlines() == ["memwise: warning: past the training context"]


def test_importing_memwise_does_not_import_torch() -> None:
    # What lets `memwise --help` answer, and a Ctrl-C be handled, before torch has loaded.
    process = run_python("import sys, memwise, memwise.cli; print('torch' in sys.modules); "
                         "print(memwise.load.__module__)")
    out, err = process.communicate(timeout=60)
    assert out.split() == ["False", "memwise.language_model"], err
