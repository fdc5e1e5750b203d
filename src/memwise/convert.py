"""`memwise convert SOURCE OUT [--quantize SCHEME]`: a model's checkpoint rewritten in the form memwise
runs it from.

Without --quantize, families with a packed form convert (the ternary ones, hgrn_bit and bitnet:
ternary matrices at 2 bits, see memwise/models/ternary/writer.py). With --quantize int8 | int4 | nf4,
conventional decoders convert to memwise's quantized checkpoint
(memwise/models/decoder/quantized_checkpoint.py), which memwise.load reads without quantizing again.
The family writes the weights and config.

What a conversion guarantees about OUT:

* OUT appears complete or not at all. Everything is written into `.OUT.partial-PID/` next to OUT
  (PID: the converting process), which is renamed to OUT only when complete.
* A conversion that fails, or is interrupted by SIGINT, SIGTERM or SIGHUP (the CLI turns all three
  into KeyboardInterrupt), removes its partial directory and leaves nothing behind. A failure to
  write (disk full, permission denied, read-only file system, OUT created by something else in the
  meantime) ends in one MemwiseError naming OUT and the reason.
* SIGKILL, a crash of the machine or power loss can leave `.OUT.partial-PID/` behind; the next
  conversion into OUT removes it, once no live process has that PID. Partials of a conversion that
  is still running are left alone. (PIDs are this machine's: on a directory shared between
  machines, a conversion running elsewhere would look dead and its partial be removed, which makes
  that conversion fail, not produce a wrong OUT.)
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from memwise.checkpoint import CheckpointReader
from memwise.errors import MemwiseError, SourceError, UnsupportedError
from memwise.presets import is_preset
from memwise.models import family_for_config
from memwise.quantization import check_scheme
from memwise.source import read_source

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
# rename(2) onto something that is already there and is not an empty directory
OUT_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def convert(source: str, out_dir: Path, progress: bool = True, quantize: str | None = None) -> Path:
    """Write the converted checkpoint of `source` (directory or hub id) into the new directory `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise MemwiseError(f"{out_dir}: already exists; convert writes a new directory")
    if not out_dir.parent.is_dir():
        raise MemwiseError(f"{out_dir.parent}: no such directory (for the output {out_dir.name})")
    remove_stale_partials(out_dir)
    if is_preset(str(source)):
        raise SourceError(f"{source}: presets have random weights; convert needs a checkpoint "
                          "(a model directory or hub id)")
    if quantize is not None:
        check_scheme(quantize)
    config, where, directory = read_source(source)
    family = family_for_config(config, where)
    if quantize is not None and not hasattr(family, "write_quantized"):
        check_scheme(quantize, config.get("model_type"))    # hgrn_bit: already ternary
        raise UnsupportedError(f"{where}: convert --quantize supports conventional decoders (gpt2, opt, phi, llama, "
                               f"mistral); this is model_type {config.get('model_type')!r}")
    if quantize is None and not hasattr(family, "write_packed"):    # refused from the model type alone, before the config's fields
        raise UnsupportedError(f"{where}: convert supports hgrn_bit and bitnet (ternary) models only; this is "
                               f"model_type {config.get('model_type')!r}, which memwise runs from its own "
                               "checkpoint without conversion (or convert it with --quantize int8|int4|nf4)")
    spec = family.spec_from_config(config, where)
    reader = CheckpointReader(directory)

    tmp = partial_dir(out_dir, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)     # a dead process's, whose PID this one now has
    try:
        tmp.mkdir()
        if quantize is not None:
            if hasattr(family, "stored_scheme") and family.stored_scheme(config, reader, where) is not None:
                raise UnsupportedError(f"{where}: the checkpoint is quantized already; convert its float source")
            family.write_quantized(spec, reader, config, tmp, check_scheme(quantize, spec.model_type))
        else:
            family.write_packed(spec, reader, config, tmp, progress)
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, tmp / name)
        os.rename(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, tmp, out_dir) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def partial_dir(out_dir: Path, pid: int) -> Path:
    """Where process `pid` writes its conversion into `out_dir` until it is complete."""
    return out_dir.parent / f".{out_dir.name}.partial-{pid}"


def remove_stale_partials(out_dir: Path) -> None:
    """Remove the partial directories of `out_dir` that conversions killed outright left behind.

    Only names partial_dir() makes (the PID as str(int) writes it) are considered, and only
    directories, never what a symlink points to."""
    pattern = re.compile(re.escape(f".{out_dir.name}.partial-") + "([1-9][0-9]*)")
    try:
        entries = list(os.scandir(out_dir.parent))
    except OSError:     # a parent we cannot list: the conversion itself will say what is wrong
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or int(match[1]) == os.getpid():
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if is_dir and not process_alive(int(match[1])):
            shutil.rmtree(entry.path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine; True when that cannot be told."""
    if os.name != "posix":      # os.kill(pid, 0) is no probe elsewhere (on Windows it sends CTRL_C_EVENT)
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):     # OverflowError: beyond any PID there can be
        return False
    except OSError:             # PermissionError: alive, someone else's; anything else: keep it to be safe
        return True
    return True


def write_error(e: OSError, tmp: Path, out_dir: Path) -> MemwiseError:
    """One line for an OSError met while converting, naming the path it is about."""
    reason = e.strerror or str(e)
    paths = [os.path.abspath(os.fsdecode(f)) for f in (e.filename, e.filename2)
             if isinstance(f, (str, bytes, os.PathLike))]
    ours = [os.path.abspath(tmp), os.path.abspath(out_dir)]
    elsewhere = [p for p in paths if not any(p == root or p.startswith(root + os.sep) for root in ours)]
    if elsewhere:       # the source side (a tokenizer file or weights that cannot be read), not the output
        return MemwiseError(f"{elsewhere[0]}: {reason} (while converting into {out_dir})")
    if e.errno in OUT_TAKEN and os.path.abspath(out_dir) in paths:     # the final rename
        reason += "; something else created it during the conversion"
    return MemwiseError(f"{out_dir}: cannot write the converted checkpoint: {reason}")
