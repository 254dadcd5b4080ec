"""Command-line plumbing shared by every entry point.

Errors in what the user gave us (paths, flags, checkpoints) are raised as
``UserError`` at the boundary and printed as one line with a non-zero exit,
never as a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence


class UserError(Exception):
    """Bad input from the user: shown as a single ``error: ...`` line, exit 2."""

    exit_code = 2


def str2bool(value: str) -> bool:
    """argparse type for the recipe's ``true|false`` flags."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main(argv)`` and turn a ``UserError`` into one line and exit code 2."""
    from src.stop_signals import Interrupted

    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Interrupted as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(128 + stop.signum)
