"""The training engine behind ``src/train_finetune_relu.py`` and ``train_finetune_npu.py``.

A script builds its parser with ``get_args_parser`` (adding its own flags) and
calls ``run_training(args, replace, enc_kwargs, dec_kwargs)``; everything else
-- data, model, precision, optimisation, checkpoints, recon output, logging --
lives here, once. The step reads as the recipe says it: forward under
autocast, loss in FP32, backward, unscale + clip, step, aux step.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.checkpoint import read_checkpoint, save_checkpoint, state_and_arch, unwrap
from src.cli import UserError, str2bool
from src.data import build_datasets, crop_side
from src.losses import RecipeLoss, msssim_per_image, psnr_per_image, bpp_from_likelihoods
from src.model_factory import BASE_MODELS, download_pretrained_state, make_arch, model_from_base_weights
from src.overflow import OverflowMonitor
from src.precision import AMP_DTYPES, LOCAL_FP32_POLICIES, apply_local_fp32, autocast_context, make_grad_scaler
from src.recon import comparison_grid, write_pngs
from src.replace_gdn import REPLACE_MODES, TRAIN_SCOPES, parameter_table, set_trainable_parts
from src.run_logger import RunLogger
from src.schedule import SCHEDULES, LRSchedule, build_schedule

AUX_LR = 1e-3  # CompressAI's example trainer uses 1e-3 for the quantiles.


class TrainingStopped(UserError):
    """The run stopped on purpose (overflow check); the last good checkpoint is intact."""


class _RemovedFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was removed: {self.help}")


# ---------------------------------------------------------------- arguments

def get_args_parser(description: str, save_dir: str = "./checkpoints", recon_dir: str = "./recon",
                    replace_parts: str = "encoder") -> argparse.ArgumentParser:
    """The flags both training scripts share, grouped by concern (``--help`` reads as a contents page)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Data")
    g.add_argument("--coco_dir", required=True,
                   help="prepared crops (with train/ val/) when --use_prepared true, else the COCO root")
    g.add_argument("--use_prepared", type=str2bool, default=True, help="read scripts.coco_prepare output")
    g.add_argument("--crop_size", type=int, default=224, help="crop side for raw COCO (--use_prepared false)")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--num_workers", type=int, default=4)
    g = p.add_argument_group("Model")
    g.add_argument("--model", default="bmshj2018-factorized", choices=BASE_MODELS, help="CompressAI zoo model")
    g.add_argument("--quality", type=int, default=3, choices=range(1, 9), metavar="{1..8}",
                   help="CompressAI quality index")
    g.add_argument("--metric", default="mse", choices=("mse", "ms-ssim"), help="which zoo weights")
    g.add_argument("--pretrained", type=str2bool, default=True, help="start from CompressAI's zoo weights")
    g.add_argument("--base_checkpoint", default=None,
                   help="start from local weights: a zoo .pth.tar or a checkpoint of this project")
    g.add_argument("--replace_parts", default=replace_parts, choices=sorted(REPLACE_MODES),
                   help="where GDN/IGDN is replaced (none = GDN control)")
    g.add_argument("--train_scope", default="replaced", choices=TRAIN_SCOPES)
    g = p.add_argument_group("Optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--max_steps_per_epoch", type=int, default=0, help="0 = whole epoch")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--optimizer", default="adam", choices=("adam", "adamw"))
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--sched", default="cosine", choices=SCHEDULES)
    g.add_argument("--onecycle_pct_start", type=float, default=0.3)
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="linear per-step LR warmup")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="<= 0 disables clipping")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", default=None, help="continue from this last.pt")
    g = p.add_argument_group("Loss")
    g.add_argument("--loss_type", default="recon", choices=("recon", "rd"))
    g.add_argument("--alpha_l1", type=float, default=0.4, help="a in a*L1 + (1-a)*(1-MS-SSIM)")
    g.add_argument("--lambda_bpp", type=float, default=0.01, help="rate weight for --loss_type rd")
    g = p.add_argument_group("Precision")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--amp", type=str2bool, default=True)
    g.add_argument("--amp_dtype", default="bf16", choices=sorted(AMP_DTYPES))
    g.add_argument("--local_fp32", default="entropy", choices=LOCAL_FP32_POLICIES,
                   help="modules that run in FP32 under autocast")
    g.add_argument("--local_fp32_custom", default="", help="comma-separated class-name parts (--local_fp32 custom)")
    g.add_argument("--overflow_check", type=str2bool, default=False)
    g.add_argument("--overflow_tol", type=float, default=1e8)
    g.add_argument("--amp_warmup_steps", action=_RemovedFlag,
                   help="use --lr_warmup_steps (LR warmup), --amp_dtype bf16 (no loss scale to warm up) "
                        "or --local_fp32 (keep fragile modules in FP32)")
    g = p.add_argument_group("Output")
    g.add_argument("--save_dir", default=save_dir)
    g.add_argument("--recon_dir", default=recon_dir)
    g.add_argument("--recon_every", type=int, default=1, help="epochs between recon dumps (and the last)")
    g.add_argument("--recon_count", type=int, default=8)
    g.add_argument("--log_every", type=int, default=50, help="steps between progress/W&B updates")
    g.add_argument("--wandb", type=str2bool, default=False, help="log to W&B (project: $WANDB_PROJECT)")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Cross-flag rules argparse cannot express; each failure is one line."""
    if args.local_fp32 == "custom" and not args.local_fp32_custom.strip():
        raise UserError("--local_fp32 custom needs --local_fp32_custom NAME[,NAME...] (class-name parts)")
    if args.sched == "onecycle" and args.lr_warmup_steps > 0:
        raise UserError("--lr_warmup_steps cannot be combined with --sched onecycle "
                        "(OneCycleLR warms up by itself: use --onecycle_pct_start)")
    for flag in ("epochs", "batch_size", "recon_every", "log_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1")
    for flag in ("num_workers", "max_steps_per_epoch", "recon_count", "lr_warmup_steps"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0")
    if not 0.0 <= args.alpha_l1 <= 1.0:
        raise UserError("--alpha_l1 must be in [0, 1]")
    if args.lr <= 0:
        raise UserError("--lr must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available (use --device cpu or auto)")
    if args.base_checkpoint and args.resume:
        raise UserError("--base_checkpoint and --resume exclude each other (resume restores everything)")


# ---------------------------------------------------------------- setup

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def create_model(args: argparse.Namespace, arch: Dict[str, Any], resume: Optional[Dict[str, Any]]) -> nn.Module:
    """The model of ``arch``, starting from --resume, --base_checkpoint, the zoo, or random init."""
    if resume is not None:
        state, ckpt_arch = state_and_arch(resume, Path(args.resume))
        if ckpt_arch is None:
            raise UserError(f"--resume {args.resume} is not a checkpoint of this project (no architecture)")
        if make_arch(**ckpt_arch) != arch:
            raise UserError(f"--resume {args.resume} holds {ckpt_arch['replace']}/{ckpt_arch['replace_parts']} "
                            f"q={ckpt_arch['quality']}; rerun with the flags of that run")
        return model_from_base_weights(arch, state, ckpt_arch, args.resume)
    if args.base_checkpoint:
        state, base_arch = state_and_arch(read_checkpoint(args.base_checkpoint), Path(args.base_checkpoint))
        print(f"weights: {args.base_checkpoint}")
        return model_from_base_weights(arch, state, base_arch, args.base_checkpoint)
    if args.pretrained:
        state = download_pretrained_state(arch)
        print(f"weights: CompressAI pretrained {arch['base_model']} q={arch['quality']} ({arch['metric']})")
        return model_from_base_weights(arch, state, dict(arch, replace="none"), "CompressAI zoo")
    print("weights: random initialisation (--pretrained false)")
    return model_from_base_weights(arch, None, None, "")


def split_aux_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(net, aux) trainable parameters: aux are the entropy bottlenecks' ``.quantiles``."""
    net, aux = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (aux if name.endswith(".quantiles") else net).append(param)
    return net, aux


def build_optimizer(args: argparse.Namespace, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=args.lr, weight_decay=args.weight_decay)


def make_loaders(args: argparse.Namespace, train_ds: Dataset, val_ds: Dataset, device: torch.device,
                 generator: torch.Generator) -> Tuple[DataLoader, DataLoader]:
    on_cuda = device.type == "cuda"
    common = dict(num_workers=args.num_workers, pin_memory=on_cuda,
                  persistent_workers=on_cuda and args.num_workers > 0)
    train = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=len(train_ds) > args.batch_size,
                       generator=generator, **common)
    val = DataLoader(val_ds, batch_size=args.batch_size, shuffle=False, **common)
    return train, val


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    best_msssim: float = -math.inf


# ---------------------------------------------------------------- the loop

def train_one_epoch(model: nn.Module, criterion: RecipeLoss, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    aux_optimizer: Optional[torch.optim.Optimizer], scaler: torch.amp.GradScaler,
                    schedule: LRSchedule, autocast: Callable, args: argparse.Namespace, state: TrainState,
                    device: torch.device, monitor: Optional[OverflowMonitor], logger: RunLogger) -> Dict[str, float]:
    """One pass over the training data; returns the epoch's mean loss parts.

    Loss parts are summed on the device and read back only every
    ``--log_every`` steps, so the step itself never waits on the host.
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    steps = len(loader) if args.max_steps_per_epoch == 0 else min(len(loader), args.max_steps_per_epoch)
    epoch_sums: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    window_sums: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    window = 0
    bar = tqdm(loader, total=steps, desc=f"train {state.epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
    for index, x in enumerate(bar):
        if index >= steps:
            break
        x = x.to(device, non_blocking=True)
        if monitor is not None:
            monitor.reset()
        with autocast():
            output = model(x)
        parts = criterion(output, x)
        if monitor is not None:
            check_overflow(monitor, parts["total"], state.step, args)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts["total"]).backward()
        if args.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if aux_optimizer is not None:
            aux_optimizer.zero_grad(set_to_none=True)
            unwrap(model).aux_loss().backward()
            aux_optimizer.step()
        schedule.after_step(state.step)
        state.step += 1

        parts = {k: v.detach() for k, v in parts.items()}
        parts["psnr"] = psnr_per_image(output["x_hat"].detach(), x).mean()
        for key, value in parts.items():
            epoch_sums[key] += value
            window_sums[key] += value
        window += 1
        if window == args.log_every or index == steps - 1:
            means = {k: v.item() / window for k, v in window_sums.items()}
            bar.set_postfix(loss=f"{means['total']:.4f}", psnr=f"{means['psnr']:.2f}")
            logger.log(train_log_entry(means, args.lambda_bpp, optimizer), step=state.step)
            window_sums.clear()
            window = 0
    bar.close()
    return {k: v.item() / max(1, steps) for k, v in epoch_sums.items()}


def check_overflow(monitor: OverflowMonitor, loss: torch.Tensor, step: int, args: argparse.Namespace) -> None:
    bad = monitor.first_bad()
    if bad is None and bool(torch.isfinite(loss)):
        return
    where = f"first bad output in module '{bad}'" if bad else "the loss is not finite"
    raise TrainingStopped(f"overflow at step {step}: {where} (NaN/Inf or |x| > {args.overflow_tol:g}); "
                          f"last good checkpoint: {Path(args.save_dir) / 'last.pt'}")


def train_log_entry(means: Dict[str, float], lambda_bpp: float, optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    return {
        "train/msssim": means["msssim"], "train/psnr": means["psnr"],
        "train/rd/total": means["total"], "train/rd/recon_total": means["recon_total"],
        "train/rd/l1": means["l1"], "train/rd/1-msssim": means["1-msssim"],
        "train/rd/bpp": means["bpp"], "train/rd/lambda_bpp": lambda_bpp,
        "lr": optimizer.param_groups[0]["lr"],
    }


@torch.no_grad()
def evaluate(model: nn.Module, criterion: RecipeLoss, loader: DataLoader, autocast: Callable,
             device: torch.device) -> Dict[str, float]:
    """Mean per-image PSNR / MS-SSIM, estimated bpp and loss over the val set."""
    model.eval()
    totals: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    count = 0
    for x in tqdm(loader, desc="val", leave=False, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        with autocast():
            output = model(x)
        n, _, h, w = x.shape
        totals["loss"] += criterion(output, x)["total"] * n
        totals["psnr"] += psnr_per_image(output["x_hat"], x).sum()
        totals["ms_ssim"] += msssim_per_image(output["x_hat"], x).sum()
        totals["bpp"] += bpp_from_likelihoods(output["likelihoods"], h * w)
        count += n
    return {k: v.item() / count for k, v in totals.items()}


@torch.no_grad()
def dump_recon(model: nn.Module, val_ds: Dataset, args: argparse.Namespace, tag: str, autocast: Callable,
               device: torch.device, logger: RunLogger, step: int) -> None:
    """Write the first ``--recon_count`` val crops and their reconstructions."""
    count = min(args.recon_count, len(val_ds))
    if count == 0:
        return
    model.eval()
    originals = torch.stack([val_ds[i] for i in range(count)])
    recons = []
    for start in range(0, count, args.batch_size):
        with autocast():
            recons.append(model(originals[start:start + args.batch_size].to(device))["x_hat"].float())
    recons = torch.cat(recons).clamp(0, 1).cpu()
    recon_dir = Path(args.recon_dir)
    write_pngs(originals, recon_dir / "origin", overwrite=False)
    write_pngs(recons, recon_dir / tag)
    logger.log_image(f"recon/{tag}", comparison_grid(originals, recons), step=step, caption="top: original")


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


def checkpoint_payload(model: nn.Module, arch: Dict[str, Any], optimizer, aux_optimizer, schedule: LRSchedule,
                       scaler, state: TrainState, args: argparse.Namespace) -> Dict[str, Any]:
    """Everything needed to rebuild (eval/export) or continue (resume) the run.

    ``update(force=True)`` refreshes the entropy coder's CDF tables first, so
    the saved model can write a real bitstream (and CompressAI's own
    ``eval_model checkpoint`` can read a GDN-control checkpoint).
    """
    bare = unwrap(model)
    bare.update(force=True)
    return {
        "state_dict": bare.state_dict(), "arch": arch,
        "optimizer": optimizer.state_dict(),
        "aux_optimizer": aux_optimizer.state_dict() if aux_optimizer else None,
        "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(),
        "epoch": state.epoch, "step": state.step, "best_msssim": state.best_msssim,
        "args": vars(args), "rng": rng_state(),
    }


def restore_training_state(ckpt: Dict[str, Any], optimizer, aux_optimizer, schedule: LRSchedule, scaler,
                           state: TrainState) -> None:
    optimizer.load_state_dict(ckpt["optimizer"])
    if aux_optimizer is not None and ckpt.get("aux_optimizer"):
        aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
    schedule.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.step, state.best_msssim = ckpt["epoch"], ckpt["step"], ckpt["best_msssim"]
    restore_rng_state(ckpt["rng"])


def epoch_line(epoch: int, args: argparse.Namespace, train: Dict[str, float], val: Dict[str, float],
               img_per_s: float) -> str:
    return (f"epoch {epoch}/{args.epochs} | RD {train['total']:.4f} | L1 {train['l1']:.4f} | "
            f"1-MSSSIM {train['1-msssim']:.4f} | BPP {train['bpp']:.4f} | λ {args.lambda_bpp:g} | "
            f"MSSSIM {train['msssim']:.4f} | PSNR {train['psnr']:.2f} dB || val MSSSIM {val['ms_ssim']:.4f} | "
            f"val PSNR {val['psnr']:.2f} dB | val BPP {val['bpp']:.4f} | {img_per_s:.1f} img/s")


def run_training(args: argparse.Namespace, replace: str, enc_kwargs: Optional[Dict[str, Any]] = None,
                 dec_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train as the flags say; returns a summary (best and last val metrics, img/s)."""
    validate_args(args)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    train_ds, val_ds = build_datasets(Path(args.coco_dir), args.use_prepared, args.crop_size)
    try:
        arch = make_arch(args.model, args.quality, args.metric, replace, args.replace_parts, enc_kwargs, dec_kwargs)
    except ValueError as err:
        raise UserError(str(err)) from None
    resume = read_checkpoint(Path(args.resume)) if args.resume else None
    model = create_model(args, arch, resume)
    side = crop_side(train_ds)
    stride = int(getattr(model, "downsampling_factor", 16))
    if side % stride:
        raise UserError(f"crops are {side}px, not a multiple of {arch['base_model']}'s stride {stride}")

    try:
        set_trainable_parts(model, args.train_scope, arch["replace_parts"])
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"architecture: {arch}")
    print(f"replaced: {', '.join(getattr(model, 'replaced_gdn', ())) or 'nothing (GDN control)'}")
    print(parameter_table(model))
    custom = [s.strip() for s in args.local_fp32_custom.split(",") if s.strip()]
    fp32_names = apply_local_fp32(model, args.local_fp32, custom)
    print(f"local FP32 ({args.local_fp32}): {', '.join(fp32_names) or 'none'}")
    model.to(device)

    net_params, aux_params = split_aux_parameters(model)
    optimizer = build_optimizer(args, net_params)
    aux_optimizer = torch.optim.Adam(aux_params, lr=AUX_LR) if aux_params else None
    generator = torch.Generator()
    train_loader, val_loader = make_loaders(args, train_ds, val_ds, device, generator)
    steps_per_epoch = len(train_loader) if not args.max_steps_per_epoch else min(len(train_loader),
                                                                                 args.max_steps_per_epoch)
    schedule = build_schedule(optimizer, args.sched, args.epochs, steps_per_epoch, args.lr,
                              args.lr_warmup_steps, args.onecycle_pct_start)
    scaler = make_grad_scaler(device.type, args.amp, args.amp_dtype)
    autocast = autocast_context(device.type, args.amp, args.amp_dtype)
    criterion = RecipeLoss(args.alpha_l1, args.loss_type, args.lambda_bpp)
    state = TrainState()
    if resume is not None:
        restore_training_state(resume, optimizer, aux_optimizer, schedule, scaler, state)
        print(f"resumed from {args.resume}: {state.epoch} epochs, {state.step} steps done")
    if state.epoch >= args.epochs:
        raise UserError(f"nothing to do: {state.epoch} epochs already done; raise --epochs above that")

    monitor = OverflowMonitor(model, args.overflow_tol) if args.overflow_check else None
    logger = RunLogger(args.wandb, vars(args), args.save_dir)
    print(f"training on {device} | {len(train_ds)} train / {len(val_ds)} val crops of {side}px | "
          f"amp={args.amp} ({args.amp_dtype}) | {steps_per_epoch} steps/epoch")
    save_dir = Path(args.save_dir)
    summary: Dict[str, Any] = {"epochs": []}
    try:
        for epoch in range(state.epoch, args.epochs):
            generator.manual_seed(args.seed * 1_000_003 + epoch)  # the data order depends on the epoch only
            start = time.perf_counter()
            train = train_one_epoch(model, criterion, train_loader, optimizer, aux_optimizer, scaler, schedule,
                                    autocast, args, state, device, monitor, logger)
            img_per_s = steps_per_epoch * args.batch_size / (time.perf_counter() - start)
            val = evaluate(model, criterion, val_loader, autocast, device)
            schedule.after_epoch(val["loss"])
            state.epoch = epoch + 1
            print(epoch_line(state.epoch, args, train, val, img_per_s))
            logger.log({"val/ms_ssim": val["ms_ssim"], "val/psnr": val["psnr"], "val/bpp": val["bpp"],
                        "val/loss": val["loss"], "epoch": state.epoch, "train/img_per_s": img_per_s},
                       step=state.step)
            improved = val["ms_ssim"] > state.best_msssim
            state.best_msssim = max(state.best_msssim, val["ms_ssim"])
            payload = checkpoint_payload(model, arch, optimizer, aux_optimizer, schedule, scaler, state, args)
            save_checkpoint(payload, save_dir / "last.pt")
            if improved:
                save_checkpoint(payload, save_dir / "best_msssim.pt")
                print(f"new best val MS-SSIM {val['ms_ssim']:.4f} -> {save_dir / 'best_msssim.pt'}")
            if state.epoch % args.recon_every == 0 or state.epoch == args.epochs:
                dump_recon(model, val_ds, args, f"epoch_{state.epoch:03d}", autocast, device, logger, state.step)
            summary["epochs"].append({"epoch": state.epoch, "train": train, "val": val, "img_per_s": img_per_s})
    finally:
        if monitor is not None:
            monitor.remove()
        logger.finish()
    summary.update(best_msssim=state.best_msssim, steps=state.step, arch=arch)
    return summary
