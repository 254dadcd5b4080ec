"""SIGINT / SIGTERM: finish the current step, save ``last.pt``, exit with a resume hint.

The handler only records the request; the training loop polls it between
steps, so no step is ever cut in half and the saved state is consistent.
"""

from __future__ import annotations

import signal
from typing import Optional


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
