"""Where a command may write: checked before any work, written atomically, nothing the user has replaced by mistake.

Every writer here replaces its output through ``write_atomic`` (a temp file,
then ``os.replace``). That is what keeps a crash from leaving half a file,
and also what would turn a device node, a FIFO or the command's own input
into a regular file holding our output: ``os.replace`` swaps the directory
entry, whatever it was. So each command checks its outputs with
``check_output_file`` before it loads a model or reads an image, and turns a
write that fails anyway (a full disk) into one line with ``write_output``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

from src.cli import UserError


def existing_ancestor(path: Path) -> Path:
    """The nearest of ``path``'s parents that exists (the folder ``write_atomic`` will create the rest in)."""
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    return parent


def check_output_file(path: Path, flag: str, inputs: Sequence[Path] = (),
                      suffixes: Optional[Sequence[str]] = None, what: str = "") -> Path:
    """Refuse, in one line, an output file that cannot be written or must not be replaced; returns ``path``.

    Refused: a name whose suffix is not one of ``suffixes`` (lower case, with
    the dot; ``what`` says what the command writes), an existing folder,
    device, FIFO or socket, a file that is one of ``inputs``, a path under a
    file, and a folder this process may not write (read-only mount, permissions).
    """
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: this writes {what or 'a file'}; name it with "
                        f"{' or '.join(suffixes)}")
    if path.exists():
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{flag} {path} is a folder; name the file to write")
        if not stat.S_ISREG(mode):
            raise UserError(f"{flag} {path} is a device, FIFO or socket, not a file: refusing to replace it")
        for source in inputs:
            if os.path.exists(source) and os.path.samefile(path, source):
                raise UserError(f"{flag} {path} is the input {source}: refusing to overwrite it; write elsewhere")
    parent = existing_ancestor(path)
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: its folder cannot be created ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} cannot be written (read-only or no permission)")
    return path


def write_output(path: Path, write: Callable[[BinaryIO], None], flag: str) -> None:
    """``write_atomic``, with a failed write (full disk, read-only mount) as one line; what was at ``path`` stays."""
    from src.checkpoint import write_atomic

    try:
        write_atomic(Path(path), write)
    except OSError as err:
        kept = "the earlier file is intact" if Path(path).exists() else "nothing was written"
        raise UserError(f"{flag} {path} could not be written ({err.strerror or err}); {kept}") from None
