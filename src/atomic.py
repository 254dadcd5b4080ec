"""Atomic file writes: nothing the user has is ever left half-written.

The content goes to a temp file in the target's folder (same filesystem), is
fsynced, then ``os.replace``d over the target: readers see the old file or
the new one, never a partial one, even if the process is killed mid-write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[BinaryIO], None], durable: bool = True) -> None:
    """Call ``write(handle)`` on a temp file, then move it to ``path``.

    ``durable`` also fsyncs (survives power loss, not only a crash); the
    data-prep crops skip it, since they can be rewritten and fsync per file
    would dominate on 118k files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would otherwise survive the rename
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_or_copy_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes, atomically, without serialising them again.

    A hard link costs nothing; since every write here replaces the directory
    entry (``os.replace``) rather than the file's contents, a later ``src``
    never changes ``dst``. Filesystems without hard links get a copy.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        def copy(handle: BinaryIO) -> None:
            with open(src, "rb") as source:
                shutil.copyfileobj(source, handle)
        write_atomic(dst, copy)
        return
    os.replace(tmp, dst)
