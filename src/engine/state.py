"""The run's saved state: counters, the checkpoint payload, resume and extension, best selections, output folders.

Plain values only (``TrainState``, the frozen ``OutputConfig`` and
``ScheduleConfig``); the flags were read once, in ``src.engine.setup``.
The payload and its file names are a contract: eval, export and the codec
rely on them. Its format has a version (``src.checkpoint_format``, which
upgrades every earlier one on read; a file of each is in ``tests/fixtures``).
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from src.checkpoint import (RunLock, link_or_copy_atomic, orphan_temp_files, prepare_output_dir, restore_rng_state,
                            rng_state, save_checkpoint, state_and_arch, unwrap)
from src.checkpoint_format import FORMAT_VERSION, TRAINING_KEYS
from src.cli import UserError
from src.data import fingerprint_change
from src.distributed import DistInfo, agree_on_error, all_gather_objects, barrier
from src.engine.trainer import Trainer
from src.model_factory import make_arch
from src.schedule import LRSchedule, build_schedule

RUN_CHECKPOINTS = ("last.pt", "best_msssim.pt", "best_loss.pt")
TRAINING_SCRIPTS = {"relu": "python -m src.train_finetune_relu", "npu": "python train_finetune_npu.py"}
RECON_TAG = re.compile(r"^epoch_\d{3,}$")
RESUME_KEYS = TRAINING_KEYS  # all of them: the engine reads them without fallbacks


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    steps_run: int = 0  # training steps run, skipped ones included (checkpoint key "step"; the LR schedule counts them)
    epoch_step: int = 0  # batches done in the current, unfinished epoch (a mid-epoch stop)
    best_msssim: float = -math.inf
    best_loss: float = math.inf  # val value of the trained loss (rate included under --loss_type rd)
    epochs_total: int = 0  # the run's length: --epochs, plus any --extend_epochs of a finished run
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    last_saved: Optional[Path] = None  # the last checkpoint this run wrote (or resumed from): None before any


@dataclass(frozen=True)
class OutputConfig:
    """Where a run writes, and what it saves beside the weights (``src.engine.setup.output_config``)."""

    save_dir: Path
    recon_dir: Path
    recon_count: int = 8
    overwrite: bool = False
    resume: Optional[str] = None
    flags: Mapping[str, Any] = field(default_factory=dict)  # checkpoint key "args": the flags as given, as a dict
    data_fingerprint: Optional[Mapping[str, Any]] = None  # the data trained on (src.data.data_fingerprint)
    amp_dtype: str = ""  # the AMP dtype the run runs, "auto" resolved (--resume compares it)

    @property
    def last(self) -> Path:
        return self.save_dir / "last.pt"


@dataclass(frozen=True)
class ScheduleConfig:
    """The LR schedule's flags (``--sched``, ``--lr``, ``--lr_warmup_steps``, ``--onecycle_pct_start``)."""

    sched: str = "cosine"
    lr: float = 1e-4
    warmup_steps: int = 0
    onecycle_pct_start: float = 0.3

    def build(self, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int) -> LRSchedule:
        return build_schedule(optimizer, self.sched, epochs, steps_per_epoch, self.lr, self.warmup_steps,
                              self.onecycle_pct_start)


# ---------------------------------------------------------------- resume

def checked_arch(raw: Any, source: str) -> Dict[str, Any]:
    """A checkpoint's architecture description, normalised; one line when it is malformed."""
    try:
        return make_arch(**raw)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: unusable architecture description ({str(err)[:160]})") from None


def check_resume(resume: Dict[str, Any], path: str) -> Dict[str, Any]:
    """A --resume checkpoint must be a training checkpoint of this project; returns its architecture.

    Checked before anything else reads it, so a bad file is named as such
    (and not, say, as a finished run).
    """
    state_and_arch(resume, Path(path))
    missing = [key for key in RESUME_KEYS if key not in resume]
    if missing:
        raise UserError(f"--resume {path} is not a training checkpoint of this project (no "
                        f"{', '.join(repr(k) for k in missing[:4])}); to start from its weights, pass it as "
                        "--base_checkpoint instead")
    if not isinstance(resume["args"], dict):
        raise UserError(f"--resume {path}: its 'args' is a {type(resume['args']).__name__}, not the flags "
                        "of a run")
    if resume.get("not_resumable"):  # set by the upgrade of its format (src.checkpoint_format)
        raise UserError(f"--resume {path} {resume['not_resumable']}")
    return checked_arch(resume["arch"], f"--resume {path}")


def check_resume_kind(resume: Dict[str, Any], path: str, arch: Dict[str, Any]) -> None:
    """The --resume checkpoint replaced GDN as this script does (ReLU or NPU blocks); said before any other check,
    since no flag of this script makes the other kind's run continue (not even --extend_epochs)."""
    saved = (resume.get("arch") or {}).get("replace")
    if saved in TRAINING_SCRIPTS and arch["replace"] in TRAINING_SCRIPTS and saved != arch["replace"]:
        raise UserError(f"--resume {path} is a run of {saved} blocks and this script trains {arch['replace']} "
                        f"blocks: resume it with {TRAINING_SCRIPTS[saved]}")


def check_resume_arch(resume: Dict[str, Any], path: str, arch: Dict[str, Any]) -> None:
    """The --resume checkpoint holds the architecture these flags build."""
    ckpt_arch = check_resume(resume, path)
    if ckpt_arch != arch:
        raise UserError(f"--resume {path} holds {ckpt_arch['replace']}/{ckpt_arch['replace_parts']} "
                        f"q={ckpt_arch['quality']}; rerun with the flags of that run")


def check_same_data(resume: Dict[str, Any], path: str, coco_dir: str, fingerprint: Dict[str, Any]) -> None:
    """A resumed run must see the data its checkpoint was trained on (``src.data.data_fingerprint``)."""
    saved = resume["data_fingerprint"]
    change = fingerprint_change(saved, fingerprint) if saved else None
    if change:
        raise UserError(f"--resume {path} was trained on other data than --coco_dir {coco_dir} "
                        f"({change}): steps per epoch, samples and the val set of best_*.pt would change; resume "
                        "with the data of that run")


def restore_training_state(ckpt: Dict[str, Any], optimizer: torch.optim.Optimizer,
                           aux_optimizer: Optional[torch.optim.Optimizer], schedule: LRSchedule,
                           scaler: torch.amp.GradScaler, state: TrainState, dist: DistInfo) -> None:
    """Optimizers, schedule, scaler, counters and this rank's RNG, as the checkpoint left them."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if aux_optimizer is not None and ckpt.get("aux_optimizer"):
        aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
    schedule.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.steps_run, state.best_msssim = ckpt["epoch"], ckpt["step"], ckpt["best_msssim"]
    state.epoch_step, state.best_loss = ckpt["epoch_step"], ckpt["best_loss"]
    per_rank = ckpt["rng_per_rank"]
    restore_rng_state(per_rank[dist.rank] if len(per_rank) == dist.world_size else per_rank[0])


def fast_forward_schedule(optimizer: torch.optim.Optimizer, schedule: LRSchedule, cfg: ScheduleConfig,
                          state: TrainState, steps: int) -> Tuple[LRSchedule, str]:
    """Rebuild cosine/onecycle for the extended length, replayed to where the run stands: (schedule, what the LR does)."""
    before = optimizer.param_groups[0]["lr"]
    if cfg.sched not in ("cosine", "onecycle"):
        return schedule, (f"--sched {cfg.sched} does not depend on the length: the LR stays {before:.3g} and goes "
                          "on as before")
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group.pop("initial_lr", None)
    schedule = cfg.build(optimizer, state.epochs_total, steps)
    with warnings.catch_warnings():  # stepping schedulers without optimizer steps is the point here
        warnings.simplefilter("ignore")
        for step in range(state.steps_run):
            schedule.after_step(step)
        for _ in range(state.epoch if cfg.sched == "cosine" else 0):
            schedule.after_epoch(math.nan)
    after = optimizer.param_groups[0]["lr"]
    return schedule, (f"--sched {cfg.sched} rebuilt for {state.epochs_total} epochs as if planned so from the start: "
                      f"the LR goes from {before:.3g} (where the run ended) to {after:.3g}, then follows the "
                      f"{cfg.sched} schedule to its end")


# ---------------------------------------------------------------- saving

def checkpoint_payload(tr: Trainer, arch: Dict[str, Any], state: TrainState, out: OutputConfig,
                       rng_states: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Everything needed to rebuild (eval/export) or continue (resume) the run.

    The entropy coder's CDF tables must be fresh (``refresh_entropy_tables``)
    so the saved model can write a real bitstream and CompressAI's own
    ``eval_model checkpoint`` can read a GDN-control checkpoint.
    """
    return {
        "format_version": FORMAT_VERSION, "state_dict": unwrap(tr.model).state_dict(), "arch": arch,
        "optimizer": tr.optimizer.state_dict(),
        "aux_optimizer": tr.aux_optimizer.state_dict() if tr.aux_optimizer else None,
        "scheduler": tr.schedule.state_dict(), "scaler": tr.scaler.state_dict(),
        "epoch": state.epoch, "step": state.steps_run, "epoch_step": state.epoch_step,
        "best_msssim": state.best_msssim, "best_loss": state.best_loss, "epochs_total": state.epochs_total,
        "world_size": tr.dist.world_size, "args": dict(out.flags), "data_fingerprint": out.data_fingerprint,
        "amp_dtype": out.amp_dtype, "rng": rng_states[0], "rng_per_rank": rng_states,
    }


def refresh_entropy_tables(model: nn.Module) -> None:
    """``update(force=True)`` on every rank, so DDP's broadcast buffers keep one shape."""
    unwrap(model).update(force=True)


def improved_selections(state: TrainState, val: Dict[str, float]) -> List[str]:
    """Update the best val MS-SSIM and val loss; the names of the ``best_*.pt`` files to refresh."""
    bests = []
    if val["ms_ssim"] > state.best_msssim:
        state.best_msssim = val["ms_ssim"]
        bests.append("best_msssim")
    if val["loss"] < state.best_loss:
        state.best_loss = val["loss"]
        bests.append("best_loss")
    return bests


def save_epoch_checkpoints(tr: Trainer, arch: Dict[str, Any], state: TrainState, out: OutputConfig,
                           bests: Sequence[str], say: Callable[[str], None]) -> None:
    """``last.pt``, serialised once, and the ``best_*.pt`` files this epoch improved (same bytes).

    ``bests`` names the improved selections: ``best_msssim`` (val MS-SSIM) and
    ``best_loss`` (val value of the trained loss, rate included under ``rd``).
    """
    refresh_entropy_tables(tr.model)
    rng_states = all_gather_objects(rng_state(), tr.dist)  # each rank resumes its own noise and worker seeds
    if tr.dist.is_main:
        save_checkpoint(checkpoint_payload(tr, arch, state, out, rng_states), out.last)
        for best in bests:
            link_or_copy_atomic(out.last, out.save_dir / f"{best}.pt")
        if "best_msssim" in bests:
            say(f"new best val MS-SSIM {state.best_msssim:.4f} -> {out.save_dir / 'best_msssim.pt'}")
        if "best_loss" in bests:
            say(f"new best val loss {state.best_loss:.4f} -> {out.save_dir / 'best_loss.pt'}")
    barrier(tr.dist)
    state.last_saved = out.last


# ---------------------------------------------------------------- output folders
# Everything a run can find wrong with its output folders is found before the first step, in one line.

def output_folders(out: OutputConfig) -> List[Tuple[str, Path]]:
    """(flag, folder) of the run's outputs: --save_dir, and --recon_dir when recon PNGs are written."""
    folders = [("--save_dir", out.save_dir)]
    if out.recon_count > 0 and out.recon_dir.resolve() != out.save_dir.resolve():
        folders.append(("--recon_dir", out.recon_dir))
    return folders


def previous_run_outputs(out: OutputConfig) -> List[Path]:
    """The outputs of an earlier run already in --save_dir / --recon_dir (what a fresh run would replace)."""
    found = [out.save_dir / name for name in RUN_CHECKPOINTS if (out.save_dir / name).exists()]
    if out.recon_count > 0 and out.recon_dir.is_dir():
        found += sorted(p for p in out.recon_dir.iterdir()
                        if (p.is_dir() and (p.name == "origin" or RECON_TAG.match(p.name))) or p.name == "report.png"
                        or (p.is_file() and p.suffix == ".json" and RECON_TAG.match(p.stem)))  # rate records
    return found


@contextlib.contextmanager
def claim_outputs(out: OutputConfig, dist: DistInfo):
    """Own the output folders for the run: usable, locked, not another run's, free of orphan temp files.

    Rank 0 does it; every rank stops if it fails. A fresh run refuses folders
    that hold another run's outputs (``--overwrite true`` replaces them, see
    ``clear_previous_run``); ``--resume`` continues the run that is there.
    """
    locks: List[RunLock] = []
    error = ""
    if dist.is_main:
        try:
            for flag, folder in output_folders(out):
                prepare_output_dir(folder, flag)
            for flag, folder in output_folders(out):
                locks.append(RunLock(folder, flag).acquire())
            previous = previous_run_outputs(out)
            if previous and not out.resume and not out.overwrite:
                shown = ", ".join(str(p) for p in previous[:3]) + (f", ... ({len(previous)} in all)"
                                                                    if len(previous) > 3 else "")
                raise UserError(f"the output folders hold another run ({shown}); continue it with --resume "
                                f"{out.last}, pass another --save_dir/--recon_dir, or "
                                "--overwrite true to replace it")
            orphans = orphan_temp_files(out.save_dir, RUN_CHECKPOINTS)
            if out.recon_count > 0:
                orphans += [p for sub in out.recon_dir.iterdir()
                            if sub.is_dir() and (sub.name == "origin" or RECON_TAG.match(sub.name))
                            for p in orphan_temp_files(sub)]
            for orphan in orphans:
                orphan.unlink(missing_ok=True)
            if orphans:
                print(f"removed {len(orphans)} temp file(s) left by a killed run: "
                      f"{', '.join(p.name for p in orphans[:3])}{', ...' if len(orphans) > 3 else ''}")
        except UserError as err:
            error = str(err)
            for lock in locks:
                lock.release()
    error = agree_on_error(error, dist)
    if error:
        raise UserError(error)
    try:
        yield
    finally:
        for lock in locks:
            lock.release()


def clear_previous_run(out: OutputConfig, say: Callable[[str], None]) -> bool:
    """``--overwrite true``: remove the earlier run's checkpoints, recon folders and sheet; returns False (done).

    Called (rank 0) right before the new run's first save, so a run that
    stops before it has anything to save leaves the earlier one whole. Only
    what a run writes is removed, so the new run never shows or selects the
    earlier run's epochs (``best_*.pt``, recon tags, ``origin/``, the sheet).
    """
    previous = previous_run_outputs(out)
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if previous:
        say(f"--overwrite true: removed the earlier run's {', '.join(p.name for p in previous[:6])}"
            + (", ..." if len(previous) > 6 else ""))
    return False
