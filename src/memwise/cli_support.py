"""What every memwise command line shares: how it ends.

- a usage error: one line, exit 2;
- a user's mistake (MemwiseError): one line, exit 1;
- any other exception: one line with its class, exit 1 (`--debug` or MEMWISE_DEBUG=1 add the
  traceback);
- SIGINT, SIGTERM, SIGHUP: "interrupted", exit 128 + the signal's number, after the code on the way
  out has cleaned up (they arrive as KeyboardInterrupt, which convert's cleanup already handles);
  a Ctrl-C while the command line is still importing its libraries ends the same way;
- a warning: one line, "memwise: warning: ...";
- a closed stdout (`memwise generate ... | head -c1`): silence, exit 128 + SIGPIPE, as a shell
  command killed by the pipe would.

memwise/cli.py and memwise/bench/cli.py both build on it, so neither imports the other's module.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager
from typing import Iterator, NoReturn

from memwise.errors import MemwiseError

EXIT_USAGE = 2
EXIT_ERROR = 1
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
SIGPIPE_NUMBER = getattr(signal, "SIGPIPE", 13)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised where the program was, so that cleanup on the way out runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def positive_int(text: str) -> int:
    """argparse type of a count flag (--batch-size, --prompt-tokens, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse prints the whole usage before an error; the design wants one line (exit status 2 as usual)."""
    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    parser.error = error  # type: ignore[method-assign]


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted, as SIGINT raises KeyboardInterrupt (main thread only)."""
    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, interrupt)
    except ValueError:      # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted(e: KeyboardInterrupt) -> int:
    """Say how the command was stopped; the exit status a shell gives a process killed by that signal."""
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    print(f"memwise: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
    return 128 + signum


def one_line_warnings() -> None:
    """Warnings (a prompt past a model's training context, unused checkpoint tensors) as one line
    each, like errors, instead of Python's file:line and source excerpt."""
    warnings.formatwarning = lambda message, *rest, **kwargs: f"memwise: warning: {message}\n"


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command and turn the way it ended into one line on stderr and an exit status."""
    debug = bool(getattr(args, "debug", False)) or os.environ.get("MEMWISE_DEBUG", "") not in ("", "0")
    one_line_warnings()
    try:
        with stop_signals_interrupt():
            return int(args.func(args) or 0)
    except MemwiseError as e:
        print(f"memwise: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        return interrupted(e)
    except BrokenPipeError:
        # Whoever read our output has gone: say nothing more, and keep Python's exit flush from
        # failing on the same pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + SIGPIPE_NUMBER
    except Exception as e:  # noqa: BLE001 - the top level: anything else is a bug to report in one line
        if debug:
            traceback.print_exc()
        print(f"memwise: error: {type(e).__name__}: {e}"
              + ("" if debug else " (MEMWISE_DEBUG=1 shows the traceback)"), file=sys.stderr)
        return EXIT_ERROR
