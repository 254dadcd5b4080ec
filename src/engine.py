"""The training engine behind ``src/train_finetune_relu.py`` and ``train_finetune_npu.py``.

A script builds its parser with ``src.train_args.get_args_parser`` (adding its own flags) and
calls ``run_training(args, replace, enc_kwargs, dec_kwargs)``; everything else
-- data, model, precision, optimisation, checkpoints, recon output, logging --
lives here, once. The step reads as the recipe says it: forward under
autocast, loss in FP32, backward, unscale + clip, step, aux step.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import random
import re
import shutil
import signal
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.checkpoint import (RunLock, link_or_copy_atomic, orphan_temp_files, prepare_output_dir, read_checkpoint,
                            restore_rng_state, rng_state, save_checkpoint, state_and_arch, unwrap)
from src.cli import Interrupted, StopRequest, UserError
from src.data import (EpochLoader, PreparedCrops, build_datasets, check_crop_fits, crop_side, data_fingerprint,
                      fingerprint_change, prepared_side, to_unit_float, val_loader)
from src.distributed import (DistInfo, agree_on_error, all_gather_objects, all_reduce_sum, barrier, init_distributed,
                             shutdown)
from src.latents import codable_latents
from src.losses import RecipeLoss, bpp_from_likelihoods, msssim_per_image, msssim_window, psnr_per_image
from src.model_factory import download_pretrained_state, make_arch, model_from_base_weights
from src.precision import (
    OverflowMonitor,
    apply_local_fp32,
    autocast_context,
    check_amp_support,
    make_grad_scaler,
    resolve_amp_dtype,
)
from src.qat import activation_quantisers, fake_quant_modules, qat_arch, qat_state, start_phase
from src.recon import comparison_grid, read_png, write_pngs, write_rate, write_report
from src.replace_gdn import parameter_table, set_trainable_parts
from src.replace_gdn_npu import fit_blocks_to_gdn
from src.run_logger import RunLogger
from src.schedule import LRSchedule, build_schedule
from src.speed import speed_up_model, use_fused_optimizer, without_host_syncs
from src.train_args import resume_flag_changes, validate_args

AUX_LR = 1e-3  # CompressAI's example trainer uses 1e-3 for the quantiles.


class TrainingStopped(UserError):
    """The run stopped on purpose (overflow check, non-finite steps, a diverged model); the last good checkpoint stays.

    Every checkpoint a run writes is *good*: its weights are finite, its val
    metrics are finite and the latents of its first val batch are codable
    (``src.latents.check_codable``). These are checked before each save
    (``unfit_to_save``); a model that fails them stops the run instead.
    Its exit code (3) tells a scheduler "the run diverged" apart from "the command was wrong" (2).
    """

    exit_code = 3


# ---------------------------------------------------------------- setup

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def checked_arch(raw: Any, source: str) -> Dict[str, Any]:
    """A checkpoint's architecture description, normalised; one line when it is malformed."""
    try:
        return make_arch(**raw)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: unusable architecture description ({str(err)[:160]})") from None


RESUME_KEYS = ("args", "arch", "epoch", "step", "optimizer", "scheduler", "scaler", "best_msssim", "rng")


def check_resume(resume: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """A --resume checkpoint must be a training checkpoint of this project; returns its architecture.

    Checked before anything else reads it, so a bad file is named as such
    (and not, say, as a finished run).
    """
    state_and_arch(resume, Path(args.resume))
    missing = [key for key in RESUME_KEYS if key not in resume]
    if missing:
        raise UserError(f"--resume {args.resume} is not a training checkpoint of this project (no "
                        f"{', '.join(repr(k) for k in missing[:4])}); to start from its weights, pass it as "
                        "--base_checkpoint instead")
    if not isinstance(resume["args"], dict):
        raise UserError(f"--resume {args.resume}: its 'args' is a {type(resume['args']).__name__}, not the flags "
                        "of a run")
    return checked_arch(resume["arch"], f"--resume {args.resume}")


def check_resume_arch(resume: Dict[str, Any], args: argparse.Namespace, arch: Dict[str, Any]) -> None:
    """The --resume checkpoint holds the architecture these flags build."""
    ckpt_arch = check_resume(resume, args)
    if ckpt_arch != arch:
        raise UserError(f"--resume {args.resume} holds {ckpt_arch['replace']}/{ckpt_arch['replace_parts']} "
                        f"q={ckpt_arch['quality']}; rerun with the flags of that run")


def create_model(args: argparse.Namespace, arch: Dict[str, Any], resume: Optional[Dict[str, Any]],
                 say: Callable[[str], None] = print) -> nn.Module:
    """The model of ``arch``, starting from --resume, --base_checkpoint, the zoo, or random init."""
    if resume is not None:
        check_resume_arch(resume, args, arch)
        state, ckpt_arch = state_and_arch(resume, Path(args.resume))
        return model_from_base_weights(arch, state, ckpt_arch, args.resume)
    if args.base_checkpoint:
        state, base_arch = state_and_arch(read_checkpoint(args.base_checkpoint), Path(args.base_checkpoint))
        if base_arch is not None:
            base_arch = checked_arch(base_arch, f"--base_checkpoint {args.base_checkpoint}")
        say(f"weights: {args.base_checkpoint}")
        return model_from_base_weights(arch, state, base_arch, args.base_checkpoint)
    if args.pretrained:
        state = download_pretrained_state(arch)
        say(f"weights: CompressAI pretrained {arch['base_model']} q={arch['quality']} ({arch['metric']})")
        return model_from_base_weights(arch, state, dict(arch, replace="none"), "CompressAI zoo")
    say("weights: random initialisation (--pretrained false)")
    return model_from_base_weights(arch, None, None, "")


def freeze_rate_only_parameters(model: nn.Module) -> int:
    """Freeze what only feeds the rate (all but g_a/g_s and the quantiles); returns how many were trainable.

    Without a rate term nothing in the loss depends on the entropy models'
    densities, nor on a hyperprior's h_a/h_s (in training, y_hat is y plus
    noise, whatever the predicted scales and means), and DDP refuses
    parameters that never receive a gradient. The quantiles still follow the aux loss.
    """
    count = 0
    for name, param in model.named_parameters():
        if not name.startswith(("g_a.", "g_s.")) and not name.endswith(".quantiles"):
            count += param.numel() if param.requires_grad else 0
            param.requires_grad_(False)
    return count


def split_aux_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(net, aux) trainable parameters: aux are the entropy bottlenecks' ``.quantiles``."""
    net, aux = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (aux if name.endswith(".quantiles") else net).append(param)
    return net, aux


def build_optimizer(args: argparse.Namespace, params: Sequence[nn.Parameter], fused: bool) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused or None)


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


def last_good_checkpoint(state: TrainState, config: "StepConfig") -> str:
    """What the messages that stop a run say about the saved state: never a file this run did not write."""
    if state.last_saved is not None:
        return f"last good checkpoint: {state.last_saved}"
    earlier = " (the last.pt there is an earlier run's, left as it was)" if config.last_checkpoint.exists() else ""
    return f"no checkpoint was written by this run{earlier}"


@dataclass(frozen=True)
class StepConfig:
    """What the training step reads from the flags: the step itself never sees argparse."""

    max_grad_norm: float = 1.0  # <= 0: no clipping
    max_bad_steps: int = 20  # skipped steps in a row that stop the run
    overflow_tol: float = 1e8  # --overflow_check: |activation| above this counts as an overflow
    log_every: int = 50  # steps per logging window (and, on the fused path, per host read)
    lambda_bpp: float = 0.01  # logged with the rate
    last_checkpoint: Path = Path("checkpoints/last.pt")  # named in the messages that stop a run

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "StepConfig":
        return cls(args.max_grad_norm, args.max_bad_steps, args.overflow_tol, args.log_every, args.lambda_bpp,
                   Path(args.save_dir) / "last.pt")


@dataclass
class Trainer:
    """What one training step needs, built once by ``run_training``."""

    model: nn.Module
    criterion: RecipeLoss
    optimizer: torch.optim.Optimizer
    aux_optimizer: Optional[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    schedule: LRSchedule
    autocast: Callable
    device: torch.device
    dist: DistInfo
    monitor: Optional[OverflowMonitor]
    logger: RunLogger
    stop: StopRequest
    config: StepConfig = StepConfig()
    placeholder: Optional[torch.Tensor] = None  # stands in for an all-corrupt batch: (1, 3, crop, crop) zeros
    deferred_skip: bool = False  # skip bad steps on the device, read the verdicts back once per log window
    memory_format: torch.memory_format = torch.contiguous_format  # of the batches (--channels_last)


# ---------------------------------------------------------------- the loop

@dataclass
class StepVerdict:
    """What all ranks agreed on after a step's backward."""

    skip: torch.Tensor  # device bool: some rank had an empty batch, a non-finite loss or non-finite gradients
    stop: bool  # a signal asked to stop after this step
    overflow: Optional[str]  # --overflow_check: where the first rank that overflowed saw it
    skip_on_host: Optional[bool] = None  # the skip verdict, when it was read back (the per-step path)


def agree_on_step(tr: Trainer, bad: torch.Tensor, overflow: Optional[str]) -> StepVerdict:
    """Skip, stop and overflow, agreed by all ranks in one collective read back on the host.

    A step with a NaN loss or an inf gradient must not reach the optimizer, and
    under DDP every rank has to make the same choice, or the ranks' collectives
    drift apart and hang. This path syncs the host every step; the deferred
    one (``agree_on_device``) does not.
    """
    flags = torch.stack([bad.float(), torch.tensor(float(tr.stop.requested), device=tr.device),
                         torch.tensor(float(overflow is not None), device=tr.device)])
    flags = all_reduce_sum(flags, tr.dist).cpu()
    where = None
    if flags[2] > 0:
        where = next(w for w in all_gather_objects(overflow or "", tr.dist) if w)
    skip = bool(flags[0] > 0)
    return StepVerdict(torch.tensor(skip, device=tr.device), bool(flags[1] > 0), where, skip_on_host=skip)


def agree_on_device(tr: Trainer, bad: torch.Tensor) -> StepVerdict:
    """The skip verdict as a device tensor, all-reduced without a host read (``--log_every`` windows read it).

    A single process sees its stop signal on the host every step; under DDP
    the ranks agree on stopping at the end of each log window (``agree_to_stop``).
    """
    skip = all_reduce_sum(bad.float().reshape(1), tr.dist)[0] > 0
    return StepVerdict(skip, tr.stop.requested and not tr.dist.enabled, None)


def agree_to_stop(tr: Trainer) -> bool:
    """Whether any rank was asked to stop (one collective; under DDP, once per log window)."""
    if not tr.dist.enabled:
        return tr.stop.requested
    flag = torch.tensor([float(tr.stop.requested)], device=tr.device)
    return bool(all_reduce_sum(flag, tr.dist).cpu()[0] > 0)


def train_step(tr: Trainer, x: torch.Tensor) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Optional[str]]:
    """Forward under autocast and the loss in FP32: (model output, loss parts, overflow report or None)."""
    if tr.monitor is not None:
        tr.monitor.reset()
    with tr.autocast():
        output = tr.model(x)
    parts = tr.criterion(output, x)
    overflow = overflow_report(tr.monitor, parts["total"], tr.config.overflow_tol) if tr.monitor is not None else None
    return output, parts, overflow


def backward_and_clip(tr: Trainer, loss: torch.Tensor) -> torch.Tensor:
    """Backward (scaled under fp16), unscale + clip; returns whether the gradients are finite (device bool).

    With fp16 the GradScaler owns inf gradients (it skips the step and lowers
    its scale), so they are reported finite here. Without it (bf16, fp32) an
    inf gradient would make the clip coefficient NaN and the weights NaN for
    good: the total norm that clipping computes anyway is the check.
    """
    params = [p for group in tr.optimizer.param_groups for p in group["params"]]
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    if tr.config.max_grad_norm > 0:
        tr.scaler.unscale_(tr.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, tr.config.max_grad_norm)
    elif not tr.scaler.is_enabled():
        grads = [p.grad for p in params if p.grad is not None]  # get_total_norm is torch >= 2.6 only
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    else:
        return torch.ones((), dtype=torch.bool, device=tr.device)
    return torch.isfinite(norm) | torch.tensor(tr.scaler.is_enabled(), device=tr.device)


def step_optimizers(tr: Trainer, skip: Optional[torch.Tensor] = None) -> None:
    """Optimizer step (through the scaler), then the aux (quantiles) step.

    With ``skip`` (a device bool) the fused optimizers skip on the device: it
    is handed to them as ``found_inf``, the tensor through which GradScaler
    tells a fused Adam to leave weights, moments and step count untouched.
    """
    if skip is not None:
        tr.optimizer.found_inf = skip.float()
    try:
        tr.scaler.step(tr.optimizer)
    finally:
        tr.optimizer.__dict__.pop("found_inf", None)
    tr.scaler.update()
    if tr.aux_optimizer is not None:
        tr.aux_optimizer.zero_grad(set_to_none=True)
        unwrap(tr.model).aux_loss().backward()
        if skip is not None:
            tr.aux_optimizer.found_inf = skip.float()
        try:
            tr.aux_optimizer.step()
        finally:
            tr.aux_optimizer.__dict__.pop("found_inf", None)


def drop_step(tr: Trainer) -> None:
    """Forget this step's gradients (and, under fp16, let the scaler lower its scale)."""
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.scaler.is_enabled():
        tr.scaler.update()


def training_step(tr: Trainer, x: Optional[torch.Tensor],
                  state: TrainState) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], StepVerdict]:
    """One optimizer step as the recipe says: forward, loss in FP32, backward, unscale + clip, step, aux step.

    ``x`` is None when every image of this rank's batch was unreadable. Every
    rank still runs forward and backward (on a placeholder whose loss counts
    0): under DDP a rank that skipped them would leave the others waiting in
    the gradient all-reduce. Then all ranks agree to step or to skip: on the
    device with the fused optimizers (``tr.deferred_skip``), else on the host.
    """
    empty = x is None
    x = tr.placeholder.to(tr.device) if empty else x
    output, parts, overflow = train_step(tr, x)
    finite_grads = backward_and_clip(tr, parts["total"] * (0.0 if empty else 1.0))
    bad = torch.tensor(empty, device=tr.device) | ~torch.isfinite(parts["total"]) | ~finite_grads
    if tr.deferred_skip:
        verdict = agree_on_device(tr, bad)
        step_optimizers(tr, skip=verdict.skip)
        return output, parts, verdict
    verdict = agree_on_step(tr, bad, overflow)
    if verdict.overflow is not None:
        raise TrainingStopped(f"overflow at step {state.steps_run}: {verdict.overflow}; "
                              f"{last_good_checkpoint(state, tr.config)}")
    count_nonfinite(state, verdict.skip_on_host, tr.config, step=state.steps_run, loud=tr.dist.is_main)
    if verdict.skip_on_host:
        drop_step(tr)
    else:
        step_optimizers(tr)
    return output, parts, verdict


def count_nonfinite(state: TrainState, skipped: bool, config: StepConfig, step: int, loud: bool = True) -> None:
    """Count a skipped ``step``; stop after ``--max_bad_steps`` in a row."""
    if not skipped:
        state.nonfinite_in_a_row = 0
        return
    state.nonfinite_in_a_row += 1
    state.nonfinite_total += 1
    if loud:
        tqdm.write(f"warning: step {step}: non-finite loss or gradients, or an empty batch, step skipped "
                   f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_total} in all)")
    if state.nonfinite_in_a_row >= config.max_bad_steps:
        raise TrainingStopped(f"{state.nonfinite_in_a_row} non-finite steps in a row at step {step}; "
                              "rerun with --overflow_check true to find the module, or lower --lr; "
                              f"{last_good_checkpoint(state, config)}")


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


def overflow_report(monitor: OverflowMonitor, loss: torch.Tensor, tolerance: float) -> Optional[str]:
    """None when the forward stayed in range; else where it broke (shared with every rank)."""
    bad = monitor.first_bad()
    if bad is None and bool(torch.isfinite(loss)):
        return None
    where = f"first bad output in module '{bad}'" if bad else "the loss is not finite"
    return f"{where} (NaN/Inf or |x| > {tolerance:g})"


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


@torch.no_grad()
def dump_recon(tr: Trainer, val_ds: Dataset, args: argparse.Namespace, tag: str, step: int,
               val: Optional[Dict[str, float]] = None) -> None:
    """Write the first ``--recon_count`` val crops and their reconstructions (rank 0).

    Beside them goes the tag's rate record: the epoch's ``val`` bpp (estimated), with the val set's PSNR and
    MS-SSIM, which the sheet (``recon/report.png``) shows beside each tile's quality and on its RD plot.
    """
    items = [val_ds[i] for i in range(min(args.recon_count, len(val_ds)))]
    items = [item for item in items if item is not None]
    if not items:
        return
    model = unwrap(tr.model).eval()
    originals = to_unit_float(torch.stack(items), torch.device("cpu"))
    recons = []
    for start in range(0, len(originals), args.batch_size):
        with tr.autocast():
            recons.append(model(originals[start:start + args.batch_size].to(tr.device))["x_hat"].float())
    recons = torch.cat(recons).clamp(0, 1).cpu()
    recon_dir = Path(args.recon_dir)
    try:
        write_pngs(originals, recon_dir / "origin", overwrite=False)
        write_pngs(recons, recon_dir / tag)
        if val is not None:
            write_rate(recon_dir, tag, val["bpp"], "estimated", f"the val set ({len(val_ds)} crops)",
                       psnr=val["psnr"], ms_ssim=val["ms_ssim"])
    except OSError as err:
        reason = "the disk is full" if err.errno == errno.ENOSPC else f"{type(err).__name__}: {err.strerror or err}"
        raise UserError(f"could not write the recon PNGs of {tag} under {recon_dir} ({reason}); this epoch's "
                        f"checkpoint is saved: free space (or pass another --recon_dir) and continue with --resume "
                        f"{Path(args.save_dir) / 'last.pt'}") from None
    tr.logger.log_image(f"recon/{tag}", comparison_grid(originals, recons), step=step, caption="top: original")


def write_recon_report(tr: Trainer, args: argparse.Namespace, step: int, say: Callable[[str], None]) -> None:
    """``<recon_dir>/report.png``: every epoch's reconstructions beside the originals, captioned (rank 0)."""
    recon_dir = Path(args.recon_dir)
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


def checkpoint_payload(tr: Trainer, arch: Dict[str, Any], state: TrainState, args: argparse.Namespace,
                       rng_states: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Everything needed to rebuild (eval/export) or continue (resume) the run.

    The entropy coder's CDF tables must be fresh (``refresh_entropy_tables``)
    so the saved model can write a real bitstream and CompressAI's own
    ``eval_model checkpoint`` can read a GDN-control checkpoint.
    """
    return {
        "state_dict": unwrap(tr.model).state_dict(), "arch": arch,
        "optimizer": tr.optimizer.state_dict(),
        "aux_optimizer": tr.aux_optimizer.state_dict() if tr.aux_optimizer else None,
        "scheduler": tr.schedule.state_dict(), "scaler": tr.scaler.state_dict(),
        "epoch": state.epoch, "step": state.steps_run, "epoch_step": state.epoch_step,
        "best_msssim": state.best_msssim, "best_loss": state.best_loss, "epochs_total": state.epochs_total,
        "world_size": tr.dist.world_size, "args": vars(args), "rng": rng_states[0], "rng_per_rank": rng_states,
    }


def refresh_entropy_tables(model: nn.Module) -> None:
    """``update(force=True)`` on every rank, so DDP's broadcast buffers keep one shape."""
    unwrap(model).update(force=True)


def restore_training_state(ckpt: Dict[str, Any], tr: Trainer, state: TrainState) -> None:
    tr.optimizer.load_state_dict(ckpt["optimizer"])
    if tr.aux_optimizer is not None and ckpt.get("aux_optimizer"):
        tr.aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
    tr.schedule.load_state_dict(ckpt["scheduler"])
    tr.scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.steps_run, state.best_msssim = ckpt["epoch"], ckpt["step"], ckpt["best_msssim"]
    state.epoch_step = ckpt.get("epoch_step", 0)
    state.best_loss = ckpt.get("best_loss", math.inf)
    per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    restore_rng_state(per_rank[tr.dist.rank] if len(per_rank) == tr.dist.world_size else per_rank[0])


def planned_epochs(ckpt: Dict[str, Any], args: argparse.Namespace, dist: DistInfo,
                   amp_dtypes: Optional[Tuple[str, str]] = None) -> Tuple[int, bool]:
    """(the resumed run's length, whether it is being extended); refuses changed run-defining flags.

    ``amp_dtypes``: (saved, current) AMP dtype as resolved, which ``--amp_dtype`` is compared by.
    """
    saved_total = int(ckpt.get("epochs_total", ckpt["args"].get("epochs", args.epochs)))
    finished = ckpt["epoch"] >= saved_total
    if finished and not args.extend_epochs:
        raise UserError(f"nothing to do: {args.resume} finished its {saved_total} epochs; add --extend_epochs N "
                        "to train N more (changing --epochs would change the schedule of the epochs already run)")
    extending = finished and args.extend_epochs > 0
    changes = resume_flag_changes(ckpt.get("args", {}), args, extending, int(ckpt.get("world_size", 1)),
                                  dist.world_size, amp_dtypes)
    if changes:
        raise UserError(f"--resume {args.resume} was run with other flags ({'; '.join(changes)}); resume with the "
                        "saved flags" + ("" if finished else ", or let it finish and then use --extend_epochs"))
    return (saved_total + args.extend_epochs if extending else saved_total), extending


def fast_forward_schedule(tr: Trainer, args: argparse.Namespace, state: TrainState, steps: int) -> str:
    """Rebuild cosine/onecycle for the extended length, replayed to where the run stands; what the LR does."""
    before = tr.optimizer.param_groups[0]["lr"]
    if args.sched not in ("cosine", "onecycle"):
        return f"--sched {args.sched} does not depend on the length: the LR stays {before:.3g} and goes on as before"
    for group in tr.optimizer.param_groups:
        group["lr"] = args.lr
        group.pop("initial_lr", None)
    tr.schedule = build_schedule(tr.optimizer, args.sched, state.epochs_total, steps, args.lr, args.lr_warmup_steps,
                                 args.onecycle_pct_start)
    with warnings.catch_warnings():  # stepping schedulers without optimizer steps is the point here
        warnings.simplefilter("ignore")
        for step in range(state.steps_run):
            tr.schedule.after_step(step)
        for _ in range(state.epoch if args.sched == "cosine" else 0):
            tr.schedule.after_epoch(math.nan)
    after = tr.optimizer.param_groups[0]["lr"]
    return (f"--sched {args.sched} rebuilt for {state.epochs_total} epochs as if planned so from the start: "
            f"the LR goes from {before:.3g} (where the run ended) to {after:.3g}, then follows the {args.sched} "
            f"schedule to its end")


def epoch_line(epoch: int, epochs: int, args: argparse.Namespace, train: Dict[str, float], val: Dict[str, float],
               img_per_s: float) -> str:
    if not train:  # every step was skipped: no train means to show
        head = "every train step of this epoch was skipped (non-finite loss or gradients, or unreadable batches)"
    else:
        if args.distortion == "mse":
            dist = f"MSE {train['mse']:.6f}"
        else:
            dist = f"L1 {train['l1']:.4f} | 1-MSSSIM {train['1-msssim']:.4f}"
        train_ms = "" if args.distortion == "mse" else f"MSSSIM {train['msssim']:.4f} | "
        head = (f"RD {train['total']:.4f} | {dist} | BPP {train['bpp']:.4f} | λ {args.lambda_bpp:g} | {train_ms}"
                f"PSNR {train['psnr']:.2f} dB")
    return (f"epoch {epoch}/{epochs} | {head} || val loss {val['loss']:.4f} | "
            f"val MSSSIM {val['ms_ssim']:.4f} | val PSNR {val['psnr']:.2f} dB | val BPP {val['bpp']:.4f} | "
            f"{img_per_s:.1f} img/s")


def weights_checksum(model: nn.Module) -> float:
    """A float fingerprint of the weights (to show that all ranks hold the same model)."""
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(unwrap(model).parameters())))


def init_from_gdn(args: argparse.Namespace, arch: Dict[str, Any], model: nn.Module, train_ds: Dataset,
                  say: Callable[[str], None], device: torch.device) -> None:
    """``--init_from_gdn``: fit the new blocks to the GDN layers of the same starting weights (on ``device``)."""
    gdn_arch = dict(arch, replace="none", replace_parts="none", qat=None)
    gdn = create_model(args, gdn_arch, None, say=lambda *a: None).to(device)
    count = min(args.gdn_fit_images, len(train_ds))
    items = [item for item in (train_ds[i] for i in range(count)) if item is not None]
    if not items:
        raise UserError(f"--init_from_gdn: none of the first {count} train crops could be decoded; "
                        "raise --gdn_fit_images")
    images = to_unit_float(torch.stack(items), device)
    say(f"init_from_gdn: fitting {len(model.replaced_gdn)} blocks on {len(images)} train crops, "
        f"{args.gdn_fit_steps} steps each")
    fit_blocks_to_gdn(gdn, model, images, steps=args.gdn_fit_steps, say=say)


def prepare_model(args: argparse.Namespace, arch: Dict[str, Any], resume: Optional[Dict[str, Any]],
                  device: torch.device, dist: DistInfo, say: Callable[[str], None], train_ds: Dataset) -> nn.Module:
    """Build, load, [fit to GDN], freeze, set FP32 islands, move to the device and wrap in DDP.

    Under torchrun only rank 0 downloads zoo weights (the others then read
    torch.hub's cache) and only rank 0 fits the blocks to GDN: DDP's
    construction broadcasts rank 0's weights to every rank.
    """
    if dist.enabled and args.pretrained and resume is None and not args.base_checkpoint:
        if dist.is_main:
            download_pretrained_state(arch)
        barrier(dist)
    model = create_model(args, arch, resume, say).to(device)
    if getattr(args, "init_from_gdn", False) and resume is None and dist.is_main:
        init_from_gdn(args, arch, model, train_ds, say, device)
    try:
        set_trainable_parts(model, args.train_scope, arch["replace_parts"])
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.loss_type == "recon":
        frozen = freeze_rate_only_parameters(model)
        if frozen:
            say(f"--loss_type recon has no rate term: what only feeds the rate (entropy densities, hyperprior; "
                f"{frozen:,} parameters) gets no gradient and is frozen; the quantiles still follow the aux loss")
    say(f"architecture: {arch}")
    say(f"replaced: {', '.join(getattr(model, 'replaced_gdn', ())) or 'nothing (GDN control)'}")
    say(parameter_table(model))
    without_host_syncs(model)  # before the FP32 islands, which wrap the class they find
    custom = [s.strip() for s in args.local_fp32_custom.split(",") if s.strip()]
    say(f"local FP32 ({args.local_fp32}): {', '.join(apply_local_fp32(model, args.local_fp32, custom)) or 'none'}")
    speed_up_model(model, args, device, say)
    if arch["qat"]:
        acts = len(activation_quantisers(model))
        say(f"QAT: {acts} activation and {len(fake_quant_modules(model)) - acts} weight quantisers in "
            f"{', '.join(arch['qat']['parts'])} ({arch['qat']['precision']}, {arch['qat']['scales']} scales); "
            f"now {qat_state(model)}")
    if dist.enabled:
        # The quantiles learn from the aux loss alone (same on every rank), so DDP ignores them.
        quantiles = [n for n, _ in model.named_parameters() if n.endswith(".quantiles")]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, quantiles)
        # Without QAT no buffer changes in training (no BatchNorm): broadcasting them each forward would only
        # add a collective. With QAT the observers' scales are buffers: rank 0's are broadcast before each
        # forward, as torch's QAT recipes do, so the ranks differ only by the one moving-average update (weight
        # 0.01) each makes on its own batch; the checkpoint holds rank 0's.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=bool(arch["qat"]))
    return model


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


def save_epoch_checkpoints(tr: Trainer, arch: Dict[str, Any], state: TrainState, args: argparse.Namespace,
                           bests: Sequence[str], say: Callable[[str], None]) -> None:
    """``last.pt``, serialised once, and the ``best_*.pt`` files this epoch improved (same bytes).

    ``bests`` names the improved selections: ``best_msssim`` (val MS-SSIM) and
    ``best_loss`` (val value of the trained loss, rate included under ``rd``).
    """
    refresh_entropy_tables(tr.model)
    rng_states = all_gather_objects(rng_state(), tr.dist)  # each rank resumes its own noise and worker seeds
    if tr.dist.is_main:
        save_dir = Path(args.save_dir)
        save_checkpoint(checkpoint_payload(tr, arch, state, args, rng_states), save_dir / "last.pt")
        for best in bests:
            link_or_copy_atomic(save_dir / "last.pt", save_dir / f"{best}.pt")
        if "best_msssim" in bests:
            say(f"new best val MS-SSIM {state.best_msssim:.4f} -> {save_dir / 'best_msssim.pt'}")
        if "best_loss" in bests:
            say(f"new best val loss {state.best_loss:.4f} -> {save_dir / 'best_loss.pt'}")
    barrier(tr.dist)
    state.last_saved = Path(args.save_dir) / "last.pt"


# ---------------------------------------------------------------- start checks and run outputs
# Everything a run can find wrong with its data and its output folders is found before the first step,
# and said in one line: not after an epoch, and not as a traceback.

RUN_CHECKPOINTS = ("last.pt", "best_msssim.pt", "best_loss.pt")
RECON_TAG = re.compile(r"^epoch_\d{3,}$")


def check_datasets(train_ds: Dataset, val_ds: Dataset, args: argparse.Namespace) -> Tuple[int, int]:
    """(train crop side, val crop side), once train and val are known to be usable.

    Prepared folders must hold one square size each (read from the headers);
    ``--crop_size`` may not contradict it. Raw COCO needs an image at least
    as large as the crop. Either way one image of each split must decode: an
    unreadable val set would otherwise show only after a whole epoch.
    """
    if isinstance(train_ds, PreparedCrops):
        side = prepared_side(train_ds, "train")
        prepared_side(val_ds, "val")  # val too must be one square size
        if args.crop_size is not None and args.crop_size != side:
            raise UserError(f"--crop_size {args.crop_size} contradicts the prepared crops in {args.coco_dir} "
                            f"({side}px): prepared crops keep the size they were made at; drop --crop_size, or "
                            "prepare crops of that size")
    else:
        check_crop_fits(train_ds, "train")
        check_crop_fits(val_ds, "val")
    sides = crop_side(train_ds, "train"), crop_side(val_ds, "val")
    for what, side in zip(("train", "val"), sides):
        try:
            msssim_window(side)  # val MS-SSIM is measured whatever the loss
        except ValueError as err:
            raise UserError(f"{what} crops of {side}px are too small for MS-SSIM's 5 scales ({err}); "
                            "use larger crops") from None
    return sides


def check_same_data(resume: Dict[str, Any], args: argparse.Namespace) -> None:
    """A resumed run must see the data its checkpoint was trained on (``data_fingerprint``)."""
    saved = resume["args"].get("data_fingerprint")
    change = fingerprint_change(saved, args.data_fingerprint) if saved else None
    if change:
        raise UserError(f"--resume {args.resume} was trained on other data than --coco_dir {args.coco_dir} "
                        f"({change}): steps per epoch, samples and the val set of best_*.pt would change; resume "
                        "with the data of that run")


def output_folders(args: argparse.Namespace) -> List[Tuple[str, Path]]:
    """(flag, folder) of the run's outputs: --save_dir, and --recon_dir when recon PNGs are written."""
    folders = [("--save_dir", Path(args.save_dir))]
    if args.recon_count > 0 and Path(args.recon_dir).resolve() != Path(args.save_dir).resolve():
        folders.append(("--recon_dir", Path(args.recon_dir)))
    return folders


def previous_run_outputs(args: argparse.Namespace) -> List[Path]:
    """The outputs of an earlier run already in --save_dir / --recon_dir (what a fresh run would replace)."""
    save_dir, recon_dir = Path(args.save_dir), Path(args.recon_dir)
    found = [save_dir / name for name in RUN_CHECKPOINTS if (save_dir / name).exists()]
    if args.recon_count > 0 and recon_dir.is_dir():
        found += sorted(p for p in recon_dir.iterdir()
                        if (p.is_dir() and (p.name == "origin" or RECON_TAG.match(p.name))) or p.name == "report.png"
                        or (p.is_file() and p.suffix == ".json" and RECON_TAG.match(p.stem)))  # rate records
    return found


@contextlib.contextmanager
def claim_outputs(args: argparse.Namespace, dist: DistInfo):
    """Own the output folders for the run: usable, locked, not another run's, free of orphan temp files.

    Rank 0 does it; every rank stops if it fails. A fresh run refuses folders
    that hold another run's outputs (``--overwrite true`` replaces them, see
    ``clear_previous_run``); ``--resume`` continues the run that is there.
    """
    locks: List[RunLock] = []
    error = ""
    if dist.is_main:
        try:
            for flag, folder in output_folders(args):
                prepare_output_dir(folder, flag)
            for flag, folder in output_folders(args):
                locks.append(RunLock(folder, flag).acquire())
            previous = previous_run_outputs(args)
            if previous and not args.resume and not args.overwrite:
                shown = ", ".join(str(p) for p in previous[:3]) + (f", ... ({len(previous)} in all)"
                                                                    if len(previous) > 3 else "")
                raise UserError(f"the output folders hold another run ({shown}); continue it with --resume "
                                f"{Path(args.save_dir) / 'last.pt'}, pass another --save_dir/--recon_dir, or "
                                "--overwrite true to replace it")
            orphans = orphan_temp_files(Path(args.save_dir), RUN_CHECKPOINTS)
            if args.recon_count > 0:
                orphans += [p for sub in Path(args.recon_dir).iterdir()
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


def clear_previous_run(args: argparse.Namespace, say: Callable[[str], None]) -> bool:
    """``--overwrite true``: remove the earlier run's checkpoints, recon folders and sheet; returns False (done).

    Called (rank 0) right before the new run's first save, so a run that
    stops before it has anything to save leaves the earlier one whole. Only
    what a run writes is removed, so the new run never shows or selects the
    earlier run's epochs (``best_*.pt``, recon tags, ``origin/``, the sheet).
    """
    previous = previous_run_outputs(args)
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if previous:
        say(f"--overwrite true: removed the earlier run's {', '.join(p.name for p in previous[:6])}"
            + (", ..." if len(previous) > 6 else ""))
    return False


def recon_originals(val_ds: Dataset, count: int) -> torch.Tensor:
    """The first ``count`` readable val crops as float (N, 3, H, W) in [0, 1]: what ``origin/`` holds."""
    items = [val_ds[i] for i in range(min(count, len(val_ds)))]
    items = [item for item in items if item is not None]
    return to_unit_float(torch.stack(items), torch.device("cpu")) if items else torch.zeros(0)


def check_recon_origin(val_ds: Dataset, args: argparse.Namespace, fresh: bool) -> None:
    """``<recon_dir>/origin`` must hold this run's val crops (checked at start of a resumed run).

    Reconstructions are only comparable with the originals they were made
    from; a resumed run whose recon folder holds other originals (another
    run's, another crop size) stops here rather than mixing them.
    """
    origin = Path(args.recon_dir) / "origin"
    if fresh or not origin.is_dir():
        return
    for index, image in enumerate(recon_originals(val_ds, args.recon_count)):
        path = origin / f"{index:05d}.png"
        if path.exists() and not torch.equal(read_png(path), image):
            raise UserError(f"{path} is not this run's val crop {index}: {origin} holds another run's originals; "
                            "pass the --recon_dir of this run")


def unfit_to_save(tr: Trainer, val_ds: Dataset, args: argparse.Namespace, val: Optional[Dict[str, float]]) -> str:
    """Why the model must not be saved ("" when it is good), agreed by every rank.

    Good means: finite weights, finite val metrics (when ``val`` is given)
    and codable latents (``src.latents``) on the first val batch, which the
    recon PNGs also show. A model that fails would write a checkpoint that
    cannot be evaluated (a range coder that never returns), exported or resumed.
    """
    model = unwrap(tr.model)
    problem = ""
    nonfinite = int(torch.stack([(~torch.isfinite(p.detach())).sum() for p in model.parameters()]).sum())
    if nonfinite:
        problem = f"{nonfinite} weights are NaN/Inf"
    elif val is not None and not all(math.isfinite(v) for v in val.values()):
        problem = "val metrics are not finite (" + ", ".join(f"{k} {v:.4g}" for k, v in val.items()) + ")"
    else:
        x = recon_originals(val_ds, args.batch_size).to(tr.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), codable_latents(model, f"on val crops 0-{len(x) - 1}"):
                if len(x):
                    model(x)
        except UserError as err:
            problem = str(err)
        finally:
            model.train(was_training)
    return agree_on_error(problem, tr.dist)


def refuse_unfit(tr: Trainer, val_ds: Dataset, args: argparse.Namespace, val: Optional[Dict[str, float]],
                 when: str, kept: str) -> None:
    """Stop the run (exit 3) instead of saving a model that is not good (``unfit_to_save``)."""
    problem = unfit_to_save(tr, val_ds, args, val)
    if problem:
        raise TrainingStopped(f"the model diverged {when} and is not saved ({problem}); {kept}; lower --lr or "
                              "rerun with --overflow_check true to find the module")


def run_training(args: argparse.Namespace, replace: str, enc_kwargs: Optional[Dict[str, Any]] = None,
                 dec_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train as the flags say; returns a summary (per-epoch metrics, best val MS-SSIM, the model)."""
    validate_args(args)
    device = resolve_device(args.device)
    dist = init_distributed(device.type)
    try:
        with claim_outputs(args, dist):
            return _train(args, replace, enc_kwargs, dec_kwargs, device, dist)
    finally:
        shutdown(dist)


def _train(args, replace, enc_kwargs, dec_kwargs, device: torch.device, dist: DistInfo) -> Dict[str, Any]:
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        amp_dtype, why = resolve_amp_dtype(device, args.amp_dtype)
        check_amp_support(device, args.amp, amp_dtype)
    except ValueError as err:
        raise UserError(str(err)) from None
    args.amp_dtype_resolved = amp_dtype  # saved with the flags: "auto" on resume is compared by what it became
    say = print if dist.is_main else (lambda *a, **k: None)
    seed_everything(args.seed)
    train_ds, val_ds = build_datasets(Path(args.coco_dir), args.use_prepared, args.crop_size, args.seed)
    side, val_side = check_datasets(train_ds, val_ds, args)
    args.data_fingerprint = data_fingerprint(train_ds, val_ds)  # saved with the flags: --resume needs the same data
    try:
        arch = make_arch(args.model, args.quality, args.metric, replace, args.replace_parts, enc_kwargs, dec_kwargs,
                         qat=qat_arch(args))
    except ValueError as err:
        raise UserError(str(err)) from None
    resume = read_checkpoint(Path(args.resume)) if args.resume else None
    state = TrainState(epochs_total=args.epochs)
    extending = False
    if resume is not None:
        check_resume(resume, args)  # the architecture is compared later: a changed flag says more than "holds q=3"
        check_same_data(resume, args)
        saved_dtype = resume["args"].get("amp_dtype_resolved") or resolve_amp_dtype(
            device, resume["args"].get("amp_dtype", args.amp_dtype))[0]
        state.epochs_total, extending = planned_epochs(resume, args, dist, amp_dtypes=(saved_dtype, amp_dtype))
    error = ""
    if dist.is_main and args.recon_count > 0:
        try:
            check_recon_origin(val_ds, args, fresh=resume is None)
        except UserError as err:
            error = str(err)
    error = agree_on_error(error, dist)  # every rank stops, not only the one that checked
    if error:
        raise UserError(error)
    model = prepare_model(args, arch, resume, device, dist, say, train_ds)
    if dist.enabled:  # the same weights everywhere, but each rank its own quantisation noise and worker seeds
        seed_everything(args.seed + dist.rank)
    stride = int(getattr(unwrap(model), "downsampling_factor", 16))
    for what, crop in (("train", side), ("val", val_side)):
        if crop % stride:
            raise UserError(f"{what} crops are {crop}px, not a multiple of {arch['base_model']}'s stride {stride}")

    net_params, aux_params = split_aux_parameters(model)
    fused = use_fused_optimizer(args, device)
    optimizer = build_optimizer(args, net_params, fused)
    on_cuda = device.type == "cuda"
    train_loader = EpochLoader(train_ds, args.batch_size, args.num_workers, args.seed, dist, on_cuda, on_cuda)
    steps = len(train_loader) if not args.max_steps_per_epoch else min(len(train_loader), args.max_steps_per_epoch)
    if steps == 0:
        raise UserError(f"{len(train_ds)} train crops over {dist.world_size} process(es) make no batch of "
                        f"{args.batch_size}")
    tr = Trainer(
        model=model, criterion=RecipeLoss(args.alpha_l1, args.loss_type, args.lambda_bpp, args.distortion), optimizer=optimizer,
        aux_optimizer=torch.optim.Adam(aux_params, lr=AUX_LR, fused=fused or None) if aux_params else None,
        scaler=make_grad_scaler(device.type, args.amp, amp_dtype),
        schedule=build_schedule(optimizer, args.sched, state.epochs_total, steps, args.lr, args.lr_warmup_steps,
                                args.onecycle_pct_start),
        autocast=autocast_context(device.type, args.amp, amp_dtype), device=device, dist=dist,
        monitor=OverflowMonitor(model, args.overflow_tol) if args.overflow_check else None,
        logger=RunLogger(args.wandb and dist.is_main, vars(args), args.save_dir), stop=StopRequest(),
        config=StepConfig.from_args(args),
        placeholder=torch.zeros(1, 3, side, side),
        memory_format=torch.channels_last if args.channels_last else torch.contiguous_format,
    )
    # Fused optimizers take the skip verdict as a device tensor; fp16's GradScaler and --overflow_check need the host.
    tr.deferred_skip = fused and not tr.scaler.is_enabled() and tr.monitor is None
    kept = f"nothing was saved in {args.save_dir}"
    if resume is not None:
        restore_training_state(resume, tr, state)
        state.last_saved = Path(args.resume)
        say(f"resumed from {args.resume}: {state.epoch} epochs + {state.epoch_step} steps done, {state.steps_run} in all")
        if extending:
            say(f"extending from {state.epoch} to {state.epochs_total} epochs: "
                f"{fast_forward_schedule(tr, args, state, steps)}")
        if (Path(args.save_dir) / "last.pt").resolve() == Path(args.resume).resolve():
            kept = f"{args.resume} is kept as it was (step {state.steps_run})"
    if arch["qat"] and resume is None:
        start_phase(unwrap(model), Path(args.qat_calib_dir), args.qat_calib_count, args.qat_range, say)
    val_batches = val_loader(val_ds, args.batch_size, args.num_workers, dist, on_cuda)
    replaces = dist.is_main and resume is None and args.overwrite  # the earlier run goes at this run's first save
    summary: Dict[str, Any] = {"epochs": []}
    with tr.stop:  # from here on SIGINT/SIGTERM finish the step and save
        say(f"training on {device} x{dist.world_size} | {len(train_ds)} train / {len(val_ds)} val crops of "
            f"{side}px | amp={args.amp} ({amp_dtype + ', ' + why if args.amp else 'fp32'}) | {steps} steps/epoch | effective batch "
            f"{args.batch_size * dist.world_size}", flush=True)
        try:
            for epoch in range(state.epoch, state.epochs_total):
                start, first_step = time.perf_counter(), state.epoch_step
                loader = train_loader.epoch(epoch, skip_batches=state.epoch_step)
                train = train_one_epoch(tr, loader, steps, state)
                img_per_s = (state.epoch_step - first_step) * args.batch_size * dist.world_size / (
                    time.perf_counter() - start)
                if state.epoch_step < steps:  # stopped by a signal mid-epoch
                    refuse_unfit(tr, val_ds, args, None, f"at step {state.steps_run}", kept)
                    replaces = replaces and clear_previous_run(args, say)
                    save_epoch_checkpoints(tr, arch, state, args, bests=(), say=say)
                    raise interrupted(tr.stop.signum, state, args)
                val = evaluate(tr, val_batches)
                tr.schedule.after_epoch(val["loss"])
                state.epoch, state.epoch_step = epoch + 1, 0
                say(epoch_line(state.epoch, state.epochs_total, args, train, val, img_per_s))
                tr.logger.log({"val/ms_ssim": val["ms_ssim"], "val/psnr": val["psnr"], "val/bpp": val["bpp"],
                               "val/loss": val["loss"], "epoch": state.epoch, "train/img_per_s": img_per_s},
                              step=state.steps_run)
                refuse_unfit(tr, val_ds, args, val, f"after epoch {state.epoch}", kept)
                replaces = replaces and clear_previous_run(args, say)
                bests = improved_selections(state, val)
                save_epoch_checkpoints(tr, arch, state, args, bests, say)
                kept = f"{Path(args.save_dir) / 'last.pt'} (epoch {state.epoch}) is kept"
                if dist.is_main and (state.epoch % args.recon_every == 0 or state.epoch == state.epochs_total):
                    dump_recon(tr, val_ds, args, f"epoch_{state.epoch:03d}", state.steps_run, val)
                summary["epochs"].append({"epoch": state.epoch, "train": train, "val": val, "img_per_s": img_per_s})
                if tr.stop.requested:
                    raise interrupted(tr.stop.signum, state, args)
            if dist.is_main and args.recon_count > 0:
                write_recon_report(tr, args, state.steps_run, say)
        finally:
            if tr.monitor is not None:
                tr.monitor.remove()
            tr.logger.finish()
    checksum = weights_checksum(model)
    sums = all_reduce_sum(torch.tensor([checksum], dtype=torch.float64, device=device), dist).item()
    say(f"done: {state.steps_run} steps; weights checksum {checksum:.6e}"
        + (f" (same on all {dist.world_size} ranks)" if dist.enabled and
           math.isclose(sums, checksum * dist.world_size, rel_tol=1e-12) else ""))
    summary.update(best_msssim=state.best_msssim, best_loss=state.best_loss, steps=state.steps_run, arch=arch, model=unwrap(model),
                   checksum=checksum, nonfinite_steps=state.nonfinite_total)
    return summary


def interrupted(signum: int, state: TrainState, args: argparse.Namespace) -> Interrupted:
    """The exception that ends a run stopped by ``signum`` after saving, with how to resume."""
    name = signal.Signals(signum).name
    last = Path(args.save_dir) / "last.pt"
    return Interrupted(f"stopped by {name} after step {state.steps_run} (epoch {state.epoch + 1}, step {state.epoch_step} "
                       f"of it); saved {last}. Resume with the same flags plus --resume {last}", signum)
