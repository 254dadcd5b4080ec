"""The epoch loop: train the epoch (log windows), validate, check, save, dump the recon PNGs.

Plain values only (a ``Trainer``, a frozen ``LoopConfig`` and
``OutputConfig``); the flags were read once, in ``src.engine.setup``.
"""

from __future__ import annotations

import errno
import math
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.checkpoint import unwrap
from src.cli import Interrupted, UserError
from src.codec.latents import codable_latents
from src.data import EpochLoader, to_unit_float
from src.distributed import agree_on_error, all_reduce_sum
from src.engine.state import OutputConfig, TrainState, clear_previous_run, improved_selections, save_epoch_checkpoints
from src.engine.step import TrainingStopped, agree_to_stop, count_nonfinite, training_step
from src.engine.trainer import Trainer
from src.losses import bpp_from_likelihoods, msssim_per_image, psnr_per_image
from src.recon import comparison_grid, read_png, write_pngs, write_rate, write_report


@dataclass(frozen=True)
class LoopConfig:
    """What the epoch loop reads from the flags (built by ``src.engine.setup.loop_config``)."""

    steps: int  # training steps per epoch (--max_steps_per_epoch, or the whole epoch)
    batch_size: int = 16  # per rank
    distortion: str = "l1_msssim"  # which train parts the epoch line shows
    lambda_bpp: float = 0.01
    recon_dir: Path = Path("recon")
    recon_count: int = 8
    recon_every: int = 1


# ---------------------------------------------------------------- one epoch

def train_one_epoch(tr: Trainer, loader: DataLoader, steps: int, state: TrainState) -> Dict[str, float]:
    """The rest of the current epoch; returns the mean loss parts over the steps run now (skipped ones excluded).

    Empty when every step was skipped: there is no mean to show (not zeros).
    Every rank sums the same keys whatever its data (a rank whose batches were
    all unreadable counts a skipped PSNR too), so the epoch's one all-reduce
    has the same shape everywhere.

    Loss parts and skip verdicts stay on the device and are read back every
    ``--log_every`` steps (and at the epoch's end). With ``tr.deferred_skip``
    that read-back is the window's one host sync; otherwise each step's
    skip/stop agreement (``agree_on_step``) syncs too.
    """
    tr.model.train()
    zero = torch.zeros((), device=tr.device)
    epoch_sums: Dict[str, torch.Tensor] = defaultdict(lambda: zero.clone())
    window_sums: Dict[str, torch.Tensor] = defaultdict(lambda: zero.clone())
    window_skips: List[Tuple[int, torch.Tensor]] = []  # (step, device bool), read back with the window
    bar = tqdm(total=steps, initial=state.epoch_step, desc=f"train {state.epoch + 1}/{state.epochs_total}", leave=False,
               dynamic_ncols=True, disable=not tr.dist.is_main)
    batches = iter(loader)
    stop = False
    while state.epoch_step < steps and not stop:
        x = next(batches, None)
        x = None if x is None else to_unit_float(x, tr.device, tr.memory_format)
        output, parts, verdict = training_step(tr, x, state)
        kept = (~verdict.skip).float()
        values = {k: v.detach() for k, v in parts.items()}
        values["psnr"] = zero if x is None else psnr_per_image(output["x_hat"].detach(), x).mean()
        for key, value in values.items():  # where() and not a product: a skipped step's NaN must not leak in
            kept_value = torch.where(verdict.skip, zero, value.float())
            epoch_sums[key] += kept_value
            window_sums[key] += kept_value
        epoch_sums["steps"] += kept
        window_sums["steps"] += kept
        window_skips.append((state.steps_run, verdict.skip))
        tr.schedule.after_step(state.steps_run)
        state.steps_run += 1
        state.epoch_step += 1
        bar.update(1)
        stop = verdict.stop
        if len(window_skips) == tr.config.log_every or state.epoch_step == steps or stop:
            stop = close_window(tr, state, window_sums, window_skips, bar) or stop
            window_sums.clear()
            window_skips.clear()
    bar.close()
    keys = sorted(k for k in epoch_sums if k != "steps")
    totals = torch.stack([epoch_sums[k] for k in keys] + [epoch_sums["steps"]])
    totals = all_reduce_sum(totals, tr.dist).cpu()
    if totals[-1].item() == 0:
        return {}
    return {k: totals[i].item() / totals[-1].item() for i, k in enumerate(keys)}


def close_window(tr: Trainer, state: TrainState, sums: Dict[str, torch.Tensor],
                 skips: List[Tuple[int, torch.Tensor]], bar: tqdm) -> bool:
    """Read a log window back (its one host sync): log its means, count its skipped steps; whether to stop.

    With deferred skips the skipped steps are counted here, in order, so
    ``--max_bad_steps`` in a row stops the run as the per-step path would
    (up to one window later: skipped steps change no weight).
    """
    keys = sorted(sums)
    flags = [s.float() for _, s in skips] if tr.deferred_skip else []
    readback = torch.stack([sums[k] for k in keys] + flags).cpu()
    means_of = dict(zip(keys, readback[: len(keys)].tolist()))
    if tr.deferred_skip:
        for (step, _), skipped in zip(skips, readback[len(keys):].tolist()):
            count_nonfinite(state, bool(skipped), tr.config, step=step, loud=tr.dist.is_main)
    kept = means_of.pop("steps")
    if kept > 0:
        means = {k: v / kept for k, v in means_of.items()}
        bar.set_postfix(loss=f"{means['total']:.4f}", psnr=f"{means['psnr']:.2f}")
        tr.logger.log(train_log_entry(means, tr.config.lambda_bpp, tr.optimizer), step=state.steps_run)
    return tr.deferred_skip and agree_to_stop(tr)


def train_log_entry(means: Dict[str, float], lambda_bpp: float, optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """W&B keys of a logging window: the parts of the distortion actually trained, rate, LR."""
    entry = {"train/psnr": means["psnr"], "train/rd/total": means["total"], "train/rd/bpp": means["bpp"],
             "train/rd/lambda_bpp": lambda_bpp, "lr": optimizer.param_groups[0]["lr"]}
    if "mse" in means:
        entry["train/rd/mse"] = means["mse"]
    else:
        entry.update({"train/msssim": means["msssim"], "train/rd/recon_total": means["distortion"],
                      "train/rd/l1": means["l1"], "train/rd/1-msssim": means["1-msssim"]})
    return entry


@torch.no_grad()
def evaluate(tr: Trainer, loader: DataLoader) -> Dict[str, float]:
    """Mean per-image PSNR / MS-SSIM, estimated bpp and loss over the val set (all ranks' shards).

    The bare model runs (no DDP forward, so no collective per batch): a rank
    whose shard holds an unreadable image skips it without the others waiting.
    """
    model = unwrap(tr.model).eval()
    keys = ("loss", "psnr", "ms_ssim", "bpp", "count")
    totals = torch.zeros(len(keys), device=tr.device)
    for x in tqdm(loader, desc="val", leave=False, dynamic_ncols=True, disable=not tr.dist.is_main):
        if x is None:
            continue
        x = to_unit_float(x, tr.device, tr.memory_format)
        with tr.autocast():
            output = model(x)
        n, _, h, w = x.shape
        totals += torch.stack([
            tr.criterion(output, x)["total"] * n,
            psnr_per_image(output["x_hat"], x).sum(),
            msssim_per_image(output["x_hat"], x).sum(),
            bpp_from_likelihoods(output["likelihoods"], h * w),
            torch.tensor(float(n), device=tr.device),
        ])
    totals = all_reduce_sum(totals, tr.dist).cpu()
    if totals[-1] == 0:
        raise UserError("no val image could be decoded")
    return {k: (totals[i] / totals[-1]).item() for i, k in enumerate(keys[:-1])}


# ---------------------------------------------------------------- recon PNGs and the sheet

def recon_originals(val_ds: Dataset, count: int) -> torch.Tensor:
    """The first ``count`` readable val crops as float (N, 3, H, W) in [0, 1]: what ``origin/`` holds."""
    items = [val_ds[i] for i in range(min(count, len(val_ds)))]
    items = [item for item in items if item is not None]
    return to_unit_float(torch.stack(items), torch.device("cpu")) if items else torch.zeros(0)


def check_recon_origin(val_ds: Dataset, recon_dir: Path, count: int, fresh: bool) -> None:
    """``<recon_dir>/origin`` must hold this run's val crops (checked at start of a resumed run).

    Reconstructions are only comparable with the originals they were made
    from; a resumed run whose recon folder holds other originals (another
    run's, another crop size) stops here rather than mixing them.
    """
    origin = recon_dir / "origin"
    if fresh or not origin.is_dir():
        return
    for index, image in enumerate(recon_originals(val_ds, count)):
        path = origin / f"{index:05d}.png"
        if path.exists() and not torch.equal(read_png(path), image):
            raise UserError(f"{path} is not this run's val crop {index}: {origin} holds another run's originals; "
                            "pass the --recon_dir of this run")


@torch.no_grad()
def dump_recon(tr: Trainer, val_ds: Dataset, cfg: LoopConfig, out: OutputConfig, tag: str, step: int,
               val: Optional[Dict[str, float]] = None) -> None:
    """Write the first ``--recon_count`` val crops and their reconstructions (rank 0).

    Beside them goes the tag's rate record: the epoch's ``val`` bpp (estimated), with the val set's PSNR and
    MS-SSIM, which the sheet (``recon/report.png``) shows beside each tile's quality and on its RD plot.
    """
    items = [val_ds[i] for i in range(min(cfg.recon_count, len(val_ds)))]
    items = [item for item in items if item is not None]
    if not items:
        return
    model = unwrap(tr.model).eval()
    originals = to_unit_float(torch.stack(items), torch.device("cpu"))
    recons = []
    for start in range(0, len(originals), cfg.batch_size):
        with tr.autocast():
            recons.append(model(originals[start:start + cfg.batch_size].to(tr.device))["x_hat"].float())
    recons = torch.cat(recons).clamp(0, 1).cpu()
    try:
        write_pngs(originals, cfg.recon_dir / "origin", overwrite=False)
        write_pngs(recons, cfg.recon_dir / tag)
        if val is not None:
            write_rate(cfg.recon_dir, tag, val["bpp"], "estimated", f"the val set ({len(val_ds)} crops)",
                       psnr=val["psnr"], ms_ssim=val["ms_ssim"])
    except OSError as err:
        reason = "the disk is full" if err.errno == errno.ENOSPC else f"{type(err).__name__}: {err.strerror or err}"
        raise UserError(f"could not write the recon PNGs of {tag} under {cfg.recon_dir} ({reason}); this epoch's "
                        f"checkpoint is saved: free space (or pass another --recon_dir) and continue with --resume "
                        f"{out.last}") from None
    if tr.logger.wandb is not None:  # the grid is only for W&B
        tr.logger.log_image(f"recon/{tag}", comparison_grid(originals, recons), step=step, caption="top: original")


def write_recon_report(tr: Trainer, recon_dir: Path, step: int, say: Callable[[str], None]) -> None:
    """``<recon_dir>/report.png``: every epoch's reconstructions beside the originals, captioned (rank 0)."""
    if not (recon_dir / "origin").is_dir():
        return
    report = recon_dir / "report.png"
    try:
        write_report([recon_dir], report)
    except (UserError, OSError) as err:  # e.g. a full disk: the training itself succeeded
        say(f"warning: recon sheet not written: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        return
    say(f"recon sheet: {report}")
    tr.logger.log_image_file("recon/report", report, step=step)


# ---------------------------------------------------------------- before each save

def unfit_to_save(tr: Trainer, val_ds: Dataset, batch_size: int, val: Optional[Dict[str, float]]) -> str:
    """Why the model must not be saved ("" when it is good), agreed by every rank.

    Good means: finite weights, finite val metrics (when ``val`` is given)
    and codable latents (``src.codec.latents``) on the first val batch, which the
    recon PNGs also show. A model that fails would write a checkpoint that
    cannot be evaluated (a range coder that never returns), exported or resumed.
    """
    model = unwrap(tr.model)
    problem = ""
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # one reduction, not one per tensor
    nonfinite = 0 if bool(torch.isfinite(weights).all()) else int((~torch.isfinite(weights)).sum())
    if nonfinite:
        problem = f"{nonfinite} weights are NaN/Inf"
    elif val is not None and not all(math.isfinite(v) for v in val.values()):
        problem = "val metrics are not finite (" + ", ".join(f"{k} {v:.4g}" for k, v in val.items()) + ")"
    else:
        x = recon_originals(val_ds, batch_size).to(tr.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), codable_latents(model, f"on val crops 0-{len(x) - 1}"):
                if len(x):
                    latents_of(model, x)
        except UserError as err:
            problem = str(err)
        finally:
            model.train(was_training)
    return agree_on_error(problem, tr.dist)


def latents_of(model: nn.Module, x: torch.Tensor) -> None:
    """Run what makes the latents the entropy coder would code: ``g_a`` alone without a hyperprior.

    ``codable_latents`` checks the outputs of ``g_a`` (y) and ``h_a`` (z);
    a factorized-prior model makes y with ``g_a`` alone, so its synthesis and
    entropy model need not run. A hyperprior model runs whole (its ``h_a``
    input differs from model to model).
    """
    if isinstance(getattr(model, "h_a", None), nn.Module):
        model(x)
    else:
        model.g_a(x)


def refuse_unfit(tr: Trainer, val_ds: Dataset, batch_size: int, val: Optional[Dict[str, float]],
                 when: str, kept: str) -> None:
    """Stop the run (exit 3) instead of saving a model that is not good (``unfit_to_save``)."""
    problem = unfit_to_save(tr, val_ds, batch_size, val)
    if problem:
        raise TrainingStopped(f"the model diverged {when} and is not saved ({problem}); {kept}; lower --lr or "
                              "rerun with --overflow_check true to find the module")


# ---------------------------------------------------------------- the epochs

def run_epochs(tr: Trainer, state: TrainState, arch: Dict[str, Any], train_loader: EpochLoader, val_ds: Dataset,
               val_batches: DataLoader, cfg: LoopConfig, out: OutputConfig, kept: str, replaces: bool,
               say: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Every epoch left: train, validate, check, save (``last.pt``, improved ``best_*.pt``), recon; per-epoch metrics.

    ``kept`` says what is on disk if the run stops before its first save;
    ``replaces``: the earlier run in the folders is removed at this run's first save (``--overwrite true``).
    """
    epochs = []
    for epoch in range(state.epoch, state.epochs_total):
        # -- train the epoch (or what a mid-epoch stop left of it)
        start, first_step = time.perf_counter(), state.epoch_step
        loader = train_loader.epoch(epoch, skip_batches=state.epoch_step)
        train = train_one_epoch(tr, loader, cfg.steps, state)
        img_per_s = (state.epoch_step - first_step) * cfg.batch_size * tr.dist.world_size / (
            time.perf_counter() - start)
        if state.epoch_step < cfg.steps:  # stopped by a signal mid-epoch
            refuse_unfit(tr, val_ds, cfg.batch_size, None, f"at step {state.steps_run}", kept)
            replaces = replaces and clear_previous_run(out, say)
            save_epoch_checkpoints(tr, arch, state, out, bests=(), say=say)
            raise interrupted(tr.stop.signum, state, out.last)
        # -- validate, log
        val = evaluate(tr, val_batches)
        tr.schedule.after_epoch(val["loss"])
        state.epoch, state.epoch_step = epoch + 1, 0
        say(epoch_line(state.epoch, state.epochs_total, cfg, train, val, img_per_s))
        tr.logger.log({"val/ms_ssim": val["ms_ssim"], "val/psnr": val["psnr"], "val/bpp": val["bpp"],
                       "val/loss": val["loss"], "epoch": state.epoch, "train/img_per_s": img_per_s},
                      step=state.steps_run)
        # -- check, save, recon
        refuse_unfit(tr, val_ds, cfg.batch_size, val, f"after epoch {state.epoch}", kept)
        replaces = replaces and clear_previous_run(out, say)
        bests = improved_selections(state, val)
        save_epoch_checkpoints(tr, arch, state, out, bests, say)
        kept = f"{out.last} (epoch {state.epoch}) is kept"
        if tr.dist.is_main and (state.epoch % cfg.recon_every == 0 or state.epoch == state.epochs_total):
            dump_recon(tr, val_ds, cfg, out, f"epoch_{state.epoch:03d}", state.steps_run, val)
        epochs.append({"epoch": state.epoch, "train": train, "val": val, "img_per_s": img_per_s})
        if tr.stop.requested:
            raise interrupted(tr.stop.signum, state, out.last)
    return epochs


def epoch_line(epoch: int, epochs: int, cfg: LoopConfig, train: Dict[str, float], val: Dict[str, float],
               img_per_s: float) -> str:
    if not train:  # every step was skipped: no train means to show
        head = "every train step of this epoch was skipped (non-finite loss or gradients, or unreadable batches)"
    else:
        if cfg.distortion == "mse":
            dist = f"MSE {train['mse']:.6f}"
        else:
            dist = f"L1 {train['l1']:.4f} | 1-MSSSIM {train['1-msssim']:.4f}"
        train_ms = "" if cfg.distortion == "mse" else f"MSSSIM {train['msssim']:.4f} | "
        head = (f"RD {train['total']:.4f} | {dist} | BPP {train['bpp']:.4f} | λ {cfg.lambda_bpp:g} | {train_ms}"
                f"PSNR {train['psnr']:.2f} dB")
    return (f"epoch {epoch}/{epochs} | {head} || val loss {val['loss']:.4f} | "
            f"val MSSSIM {val['ms_ssim']:.4f} | val PSNR {val['psnr']:.2f} dB | val BPP {val['bpp']:.4f} | "
            f"{img_per_s:.1f} img/s")


def interrupted(signum: int, state: TrainState, last: Path) -> Interrupted:
    """The exception that ends a run stopped by ``signum`` after saving, with how to resume."""
    name = signal.Signals(signum).name
    return Interrupted(f"stopped by {name} after step {state.steps_run} (epoch {state.epoch + 1}, step {state.epoch_step} "
                       f"of it); saved {last}. Resume with the same flags plus --resume {last}", signum)


def weights_checksum(model: nn.Module) -> float:
    """A float fingerprint of the weights (to show that all ranks hold the same model)."""
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(unwrap(model).parameters())))
