"""This repository's own commands, run in a subprocess: the one runner the demo and the benches use.

``run`` prints the command first (``$ python ...  > log``), sends its output to a log (or the console), and
fails with one line (``CommandFailed``, a ``UserError``) holding the log's tail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

from src.cli import UserError

REPO = Path(__file__).resolve().parents[1]


class CommandFailed(UserError):
    """A bench's command exited non-zero (or ran out of time); the message names it and its log."""


def python(*argv: str) -> List[str]:
    """``python script.py ...`` for a path ending in .py, else ``python -m module ...``."""
    return [sys.executable, *argv] if argv[0].endswith(".py") else [sys.executable, "-m", *argv]


def shown(cmd: Sequence[str]) -> str:
    return " ".join(["python", *cmd[1:]] if cmd[0] == sys.executable else cmd)


def run(cmd: Sequence[str], log: Optional[Path] = None, cwd: Path = REPO, env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None, append: bool = False, dry_run: bool = False) -> str:
    """Run ``cmd`` (printed first); its output to ``log`` (appended with ``append``) or, without one, the console.

    Returns the output written to ``log`` ("" without one). Raises ``CommandFailed`` on a non-zero exit or a
    timeout, after printing the log's last lines to stderr.
    """
    print(f"$ {shown(cmd)}" + (f"  > {log}" if log else ""), flush=True)
    if dry_run:
        return ""
    environ = dict(os.environ, **(env or {}))
    if log is None:
        try:
            code = subprocess.run(list(cmd), cwd=cwd, env=environ, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"timed out after {timeout:g} s: {shown(cmd)}") from None
        if code != 0:
            raise CommandFailed(f"exit code {code} from: {shown(cmd)}")
        return ""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if append and log.exists() else 0
    with open(log, "a" if append else "w") as handle:
        try:
            code = subprocess.run(list(cmd), cwd=cwd, env=environ, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    with open(log, errors="replace") as handle:
        handle.seek(start)
        output = handle.read()
    if code != 0:
        tail = [line.split("\r")[-1] for line in output.splitlines()[-15:]]
        print("\n".join(tail), file=sys.stderr)
        what = f"timed out after {timeout:g} s" if code is None else f"exit code {code}"
        raise CommandFailed(f"{what} from: {shown(cmd)} (see {log})")
    return output
