"""Checkpoints that survive crashes and never execute code when read.

Writes are atomic (``write_atomic`` below): a crash, even SIGKILL, mid-save leaves the
previous file intact. Reads use ``torch.load(weights_only=True)``, which refuses pickled
objects instead of running them; that is why checkpoints hold only tensors,
plain containers and numbers (``vars(args)``, never the Namespace). Every read
checkpoint of this project comes out in the current format
(``src.checkpoint_format``: its version and the upgrade of each earlier one).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import random
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn

from src.checkpoint_format import upgrade_payload
from src.cli import UserError


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / torch.compile wrappers (their state dicts carry prefixes)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def payload_bytes(payload: Any) -> int:
    """The tensor bytes in a (nested) checkpoint payload: about what it takes on disk."""
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(payload_bytes(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(payload_bytes(v) for v in payload)
    return 0


def save_checkpoint(payload: Dict[str, Any], path: Path) -> None:
    """Write atomically; a full disk is one line with the space needed and left (the old file stays)."""
    path = Path(path)
    try:
        write_atomic(path, lambda handle: torch.save(payload, handle))
    except (OSError, RuntimeError) as err:
        needed, free = payload_bytes(payload), shutil.disk_usage(path.parent).free
        if not (isinstance(err, OSError) and err.errno == errno.ENOSPC) and free >= needed:
            raise
        raise UserError(f"could not write {path}: the disk is full (about {needed / 2**20:.1f} MiB needed, "
                        f"{free / 2**20:.1f} MiB free there); free space or point --save_dir elsewhere "
                        "(the previous file is intact)") from None


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint (upgraded to the current format) or a plain state dict safely; bad files are one line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported global" not in text and "GLOBAL" not in text:
            raise UserError(f"{path} is not a readable PyTorch checkpoint (its contents do not unpickle)") from None
        culprit = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "pickled objects")
        raise UserError(f"refused to load {path}: it holds objects that weights_only=True does not allow "
                        f"({culprit[:160]})") from None
    except Exception as err:  # noqa: BLE001 -- a text file or an image fails deep in torch.load in many ways
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {reason})") from None
    if not isinstance(payload, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(payload).__name__}, not a dict")
    return upgrade_payload(payload, str(path))


def state_and_arch(payload: Dict[str, Any], path: Path):
    """(state_dict, arch or None) of a project checkpoint or a plain zoo state dict."""
    if "state_dict" in payload:
        state, arch = payload["state_dict"], payload.get("arch")
    else:
        state, arch = payload, None
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no model weights (expected a 'state_dict' of tensors)")
    return state, arch


def rng_state() -> Dict[str, Any]:
    """All RNG states as weights_only-safe values (tensors, lists, ints)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------- atomic writes
# Atomic file writes: nothing the user has is ever left half-written.
#
# The content goes to a temp file in the target's folder (same filesystem), is
# fsynced, then ``os.replace``d over the target: readers see the old file or
# the new one, never a partial one, even if the process is killed mid-write.

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
    # The writer's pid is in the name, so a temp file orphaned by a kill -9 can be told from one being written.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
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


# ---------------------------------------------------------------- output folders
# A run owns its --save_dir and --recon_dir: created and checked at start, locked against a second run
# at the same time, cleaned of the temp files a killed run left there.

def swap_in_folder(built: Path, target: Path) -> None:
    """Put the finished folder ``built`` at ``target`` by renames only; what was at ``target`` goes only after.

    A crash leaves either the old folder or the new one at ``target`` (the old one parked beside it in a
    ``.NAME.old.*`` folder), never a half-written one. Callers check first that ``target`` may be replaced.
    """
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, old / "previous")
        os.replace(built, target)
        shutil.rmtree(old)
    else:
        os.replace(built, target)


def prepare_output_dir(folder: Path, flag: str) -> None:
    """Create ``folder`` (an output folder given as ``flag``) or say in one line why it cannot be used."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder; pass a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {folder} cannot be created ({type(err).__name__}: {err.strerror or err}); "
                        "pass a folder you can write") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not writable; pass a folder you can write")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """``<folder>/.train.lock``: one training run at a time per output folder.

    The file holds the owner's pid and host (for the message); what makes it a
    lock is ``flock``, which the kernel drops when its process dies, however it
    dies: a lock left by a dead pid (SIGKILL, a crash) is simply taken over. It
    is removed on release.
    """

    NAME = ".train.lock"

    def __init__(self, folder: Path, flag: str):
        self.path, self.flag, self.fd = Path(folder) / self.NAME, flag, None

    def acquire(self) -> "RunLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.flag} {self.path.parent} is in use by another training run ({holder}; lock "
                                f"{self.path}); wait for it to end or pass another {self.flag}") from None
            try:  # the file may have been released and removed between our open and our flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


_TEMP_NAME = re.compile(r"^\.(?P<target>.+?)\.(?:(?P<pid>\d+)\.)?[^.]+\.tmp$|^\.(?P<link>.+)\.(?P<lpid>\d+)\.link$")


def orphan_temp_files(folder: Path, targets: Optional[Iterable[str]] = None) -> List[Path]:
    """Temp files of ``write_atomic`` / ``link_or_copy_atomic`` in ``folder`` whose writer is dead.

    ``targets``: only temps of these file names. Called by the owner of the
    folder's ``RunLock``, so no live run of this project writes there; a temp
    without a pid in its name predates the pid naming and is an orphan too.
    """
    wanted = set(targets) if targets is not None else None
    found = []
    for path in Path(folder).glob(".*"):
        match = _TEMP_NAME.match(path.name)
        if not match or not path.is_file():
            continue
        target, pid = (match["target"], match["pid"]) if match["target"] else (match["link"], match["lpid"])
        if (wanted is None or target in wanted) and not (pid and pid_alive(int(pid))):
            found.append(path)
    return found
