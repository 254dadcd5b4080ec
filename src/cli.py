"""Command-line plumbing shared by every entry point.

Errors in what the user gave us (paths, flags, checkpoints) are raised as
``UserError`` at the boundary and printed as one line with a non-zero exit,
never as a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import signal
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


    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Interrupted as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(128 + stop.signum)


# ---------------------------------------------------------------- stop signals
# SIGINT / SIGTERM: finish the current step, save ``last.pt``, exit with a resume hint.
#
# The handler only records the request; the training loop polls it between
# steps, so no step is ever cut in half and the saved state is consistent.

class StopRequest:
    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving last.pt", flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Interrupted(Exception):
    """Training stopped on a signal after saving; the CLI exits 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
