"""What every memwise command line shares: one-line usage errors (exit 2) and one-line user errors (exit 1).

memwise/cli.py and memwise/bench/cli.py both build on it, so neither imports the other's module.
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from memwise.errors import MemwiseError

EXIT_USAGE = 2


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse prints the whole usage before an error; the design wants one line (exit status 2 as usual)."""
    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    parser.error = error  # type: ignore[method-assign]


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command; a user's mistake becomes one line on stderr and exit status 1."""
    try:
        return int(args.func(args) or 0)
    except MemwiseError as e:
        print(f"memwise: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memwise: interrupted", file=sys.stderr)
        return 130
