"""Setup: the one engine file that reads the flags.

It turns the parsed flags into built objects (device, seeds, data, model,
optimisers, loaders: a ``Trainer``) and frozen configs (``StepConfig``,
``LoopConfig``, ``OutputConfig``, ``ScheduleConfig``), so that the step,
the loop and the saved state never see argparse. ``build_trainer`` is also
what the benches use to run the engine's own step.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from src.checkpoint import read_checkpoint, state_and_arch, unwrap
from src.cli import StopRequest, UserError
from src.data import EpochLoader, build_datasets, check_datasets, data_fingerprint, to_unit_float, val_loader
from src.distributed import DistInfo, agree_on_error, barrier
from src.engine.loop import LoopConfig, check_recon_origin
from src.engine.state import (OutputConfig, ScheduleConfig, TrainState, check_resume, check_resume_arch,
                              check_resume_kind, check_same_data, checked_arch, fast_forward_schedule,
                              restore_training_state)
from src.engine.trainer import StepConfig, Trainer
from src.losses import RecipeLoss
from src.model_factory import download_pretrained_state, make_arch, model_from_base_weights
from src.precision import (OverflowMonitor, apply_local_fp32, autocast_context, check_amp_support, make_grad_scaler,
                           resolve_amp_dtype)
from src.quant.fake_quant import activation_quantisers, fake_quant_modules, qat_state
from src.quant.scheme import qat_arch
from src.replace_gdn import freeze_rate_only_parameters, parameter_table, set_trainable_parts, split_aux_parameters
from src.replace_gdn_npu import fit_blocks_to_gdn
from src.run_logger import RunLogger
from src.speed import speed_up_model, use_fused_optimizer, without_host_syncs
from src.train_args import resume_flag_changes

AUX_LR = 1e-3  # CompressAI's example trainer uses 1e-3 for the quantiles.


@dataclass(frozen=True)
class GdnFit:
    """``--init_from_gdn``: fit each new block to the GDN/IGDN it replaces before fine-tuning (NPU script)."""

    steps: int = 300  # regression steps per block (--gdn_fit_steps)
    images: int = 16  # train crops whose activations are fitted (--gdn_fit_images)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def requested_device(args: argparse.Namespace) -> torch.device:
    return resolve_device(args.device)


# ---------------------------------------------------------------- flags -> frozen configs

def step_config(args: argparse.Namespace) -> StepConfig:
    return StepConfig(max_grad_norm=args.max_grad_norm, max_bad_steps=args.max_bad_steps,
                      overflow_tol=args.overflow_tol, log_every=args.log_every, lambda_bpp=args.lambda_bpp,
                      last_checkpoint=Path(args.save_dir) / "last.pt")


def loop_config(args: argparse.Namespace, steps: int) -> LoopConfig:
    return LoopConfig(steps=steps, batch_size=args.batch_size, distortion=args.distortion, lambda_bpp=args.lambda_bpp,
                      recon_dir=Path(args.recon_dir), recon_count=args.recon_count, recon_every=args.recon_every)


def output_config(args: argparse.Namespace, data_fingerprint: Optional[Dict[str, Any]] = None,
                  amp_dtype: str = "") -> OutputConfig:
    """The output folders, and what every checkpoint stores beside the weights: the flags as given
    (``vars(args)``), and the data and AMP dtype that setup found for them."""
    return OutputConfig(save_dir=Path(args.save_dir), recon_dir=Path(args.recon_dir), recon_count=args.recon_count,
                        overwrite=args.overwrite, resume=args.resume, flags=dict(vars(args)),
                        data_fingerprint=data_fingerprint, amp_dtype=amp_dtype)


def schedule_config(args: argparse.Namespace) -> ScheduleConfig:
    return ScheduleConfig(sched=args.sched, lr=args.lr, warmup_steps=args.lr_warmup_steps,
                          onecycle_pct_start=args.onecycle_pct_start)


# ---------------------------------------------------------------- the model

def create_model(args: argparse.Namespace, arch: Dict[str, Any], resume: Optional[Dict[str, Any]],
                 say: Callable[[str], None] = print) -> nn.Module:
    """The model of ``arch``, starting from --resume, --base_checkpoint, the zoo, or random init."""
    if resume is not None:
        check_resume_arch(resume, args.resume, arch)
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


def build_optimizer(args: argparse.Namespace, params: Sequence[nn.Parameter], fused: bool) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused or None)


def init_from_gdn(args: argparse.Namespace, fit: GdnFit, arch: Dict[str, Any], model: nn.Module, train_ds: Dataset,
                  say: Callable[[str], None], device: torch.device) -> None:
    """``--init_from_gdn``: fit the new blocks to the GDN layers of the same starting weights (on ``device``)."""
    gdn_arch = dict(arch, replace="none", replace_parts="none", qat=None)
    gdn = create_model(args, gdn_arch, None, say=lambda *a: None).to(device)
    count = min(fit.images, len(train_ds))
    items = [item for item in (train_ds[i] for i in range(count)) if item is not None]
    if not items:
        raise UserError(f"--init_from_gdn: none of the first {count} train crops could be decoded; "
                        "raise --gdn_fit_images")
    images = to_unit_float(torch.stack(items), device)
    say(f"init_from_gdn: fitting {len(model.replaced_gdn)} blocks on {len(images)} train crops, "
        f"{fit.steps} steps each")
    fit_blocks_to_gdn(gdn, model, images, steps=fit.steps, say=say)


def configure_model(model: nn.Module, args: argparse.Namespace, arch: Dict[str, Any], device: torch.device,
                    say: Callable[[str], None] = print) -> nn.Module:
    """What trains (``--train_scope``, ``--loss_type``), the sync-free entropy model, FP32 islands, speed flags."""
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
    speed_up_model(model, device, say, channels_last=args.channels_last, compile=args.compile)
    return model


def prepare_model(args: argparse.Namespace, arch: Dict[str, Any], resume: Optional[Dict[str, Any]],
                  device: torch.device, dist: DistInfo, say: Callable[[str], None], train_ds: Dataset,
                  gdn_fit: Optional[GdnFit] = None) -> nn.Module:
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
    if gdn_fit is not None and resume is None and dist.is_main:
        init_from_gdn(args, gdn_fit, arch, model, train_ds, say, device)
    configure_model(model, args, arch, device, say)
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
        # add a collective. With QAT the quantisers' flags and frozen scales are buffers (learned scales are
        # parameters, kept equal by DDP's gradient all-reduce): rank 0's are broadcast before each forward, as
        # torch's QAT recipes do, so every rank rounds on the same grid.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=bool(arch["qat"]))
    return model


def start_qat_phase(model: nn.Module, args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """``--qat true`` on a fresh run: calibrate the quantisers on whole photos, then train with those scales.

    QAT's calibration is PTQ itself (onnxruntime writes the graph the scales are read from), so its module is
    imported here, on the one path that needs it: float training never loads onnx (``tests/test_layout.py``).
    """
    from src.quant.qat import start_phase

    start_phase(model, Path(args.qat_calib_dir), args.qat_calib_count, args.qat_range, say)


# ---------------------------------------------------------------- start checks

def planned_epochs(ckpt: Dict[str, Any], args: argparse.Namespace, dist: DistInfo,
                   amp_dtypes: Optional[Tuple[str, str]] = None) -> Tuple[int, bool]:
    """(the resumed run's length, whether it is being extended); refuses changed run-defining flags.

    ``amp_dtypes``: (saved, current) AMP dtype as resolved, which ``--amp_dtype`` is compared by.
    """
    saved_total = int(ckpt["epochs_total"])
    finished = ckpt["epoch"] >= saved_total
    if finished and not args.extend_epochs:
        raise UserError(f"nothing to do: {args.resume} finished its {saved_total} epochs; add --extend_epochs N "
                        "to train N more (changing --epochs would change the schedule of the epochs already run)")
    extending = finished and args.extend_epochs > 0
    changes = resume_flag_changes(ckpt["args"], args, extending, int(ckpt["world_size"]),
                                  dist.world_size, amp_dtypes)
    if changes:
        raise UserError(f"--resume {args.resume} was run with other flags ({'; '.join(changes)}); resume with the "
                        "saved flags" + ("" if finished else ", or let it finish and then use --extend_epochs"))
    return (saved_total + args.extend_epochs if extending else saved_total), extending


# ---------------------------------------------------------------- the trainer

def build_trainer(args: argparse.Namespace, model: nn.Module, device: torch.device, side: int,
                  dist: DistInfo = DistInfo(), steps: int = 1, state: Optional[TrainState] = None,
                  resume: Optional[Dict[str, Any]] = None, extending: bool = False,
                  say: Callable[[str], None] = print) -> Trainer:
    """Loss, optimisers, scaler, schedule, autocast and checks around a prepared ``model``, as the flags say.

    With ``resume`` the optimisers, schedule, scaler, counters (into
    ``state``) and RNG continue from the checkpoint; ``extending`` rebuilds
    the schedule for the longer run. ``side`` is the crop size (for the
    placeholder of an all-unreadable batch), ``steps`` the steps per epoch.
    """
    state = state if state is not None else TrainState(epochs_total=args.epochs)
    amp_dtype = resolve_amp_dtype(device, args.amp_dtype)[0]
    net_params, aux_params = split_aux_parameters(model)
    fused = use_fused_optimizer(args.fused_optimizer, device)
    optimizer = build_optimizer(args, net_params, fused)
    aux_optimizer = torch.optim.Adam(aux_params, lr=AUX_LR, fused=fused or None) if aux_params else None
    scaler = make_grad_scaler(device.type, args.amp, amp_dtype)
    sched = schedule_config(args)
    schedule = sched.build(optimizer, state.epochs_total, steps)
    criterion = RecipeLoss(args.alpha_l1, args.loss_type, args.lambda_bpp, args.distortion)
    monitor = OverflowMonitor(model, args.overflow_tol) if args.overflow_check else None
    logger = RunLogger(args.wandb and dist.is_main, vars(args), args.save_dir)
    if resume is not None:
        restore_training_state(resume, optimizer, aux_optimizer, schedule, scaler, state, dist)
        state.last_saved = Path(args.resume)
        say(f"resumed from {args.resume}: {state.epoch} epochs + {state.epoch_step} steps done, {state.steps_run} in all")
        if extending:
            schedule, what = fast_forward_schedule(optimizer, schedule, sched, state, steps)
            say(f"extending from {state.epoch} to {state.epochs_total} epochs: {what}")
    return Trainer(
        model=model, criterion=criterion, optimizer=optimizer, aux_optimizer=aux_optimizer, scaler=scaler,
        schedule=schedule, autocast=autocast_context(device.type, args.amp, amp_dtype), device=device, dist=dist,
        monitor=monitor, logger=logger, stop=StopRequest(), config=step_config(args),
        placeholder=torch.zeros(1, 3, side, side),
        # Fused optimizers take the skip verdict as a device tensor; fp16's GradScaler and --overflow_check need the host.
        deferred_skip=fused and not scaler.is_enabled() and monitor is None,
        memory_format=torch.channels_last if args.channels_last else torch.contiguous_format,
    )


@dataclass(frozen=True)
class Run:
    """Everything a run is built from, ready for the epoch loop."""

    tr: Trainer
    state: TrainState
    arch: Dict[str, Any]
    train_loader: EpochLoader
    val_ds: Dataset
    val_batches: DataLoader
    loop: LoopConfig
    out: OutputConfig
    kept: str  # what a stop before the first save leaves on disk
    replaces: bool  # --overwrite true on a fresh run: the earlier run goes at this run's first save
    banner: str  # the "training on ..." line


def build_run(args: argparse.Namespace, replace: str, enc_kwargs: Optional[Dict[str, Any]],
              dec_kwargs: Optional[Dict[str, Any]], device: torch.device, dist: DistInfo,
              gdn_fit: Optional[GdnFit] = None) -> Run:
    """Device, precision, seeds, data, model, optimisers and loaders, in the order the bit-exact resume relies on."""
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        amp_dtype, why = resolve_amp_dtype(device, args.amp_dtype)
        check_amp_support(device, args.amp, amp_dtype)
    except ValueError as err:
        raise UserError(str(err)) from None
    say = print if dist.is_main else (lambda *a, **k: None)
    seed_everything(args.seed)
    # -- data
    train_ds, val_ds = build_datasets(Path(args.coco_dir), args.use_prepared, args.crop_size, args.seed)
    side, val_side = check_datasets(train_ds, val_ds, args.crop_size, args.coco_dir)
    fingerprint = data_fingerprint(train_ds, val_ds)  # saved beside the flags: --resume needs the same data
    try:
        arch = make_arch(args.model, args.quality, args.metric, replace, args.replace_parts, enc_kwargs, dec_kwargs,
                         qat=qat_arch(args))
    except ValueError as err:
        raise UserError(str(err)) from None
    # -- the checkpoint to resume, checked before anything is built from it
    resume = read_checkpoint(Path(args.resume)) if args.resume else None
    state = TrainState(epochs_total=args.epochs)
    extending = False
    if resume is not None:
        check_resume(resume, args.resume)  # the architecture is compared later: a changed flag says more
        check_resume_kind(resume, args.resume, arch)  # ... except the script's own kind, which no flag changes
        check_same_data(resume, args.resume, args.coco_dir, fingerprint)
        saved_dtype = resume["amp_dtype"] or resolve_amp_dtype(  # "auto" is compared by what it became
            device, resume["args"].get("amp_dtype", args.amp_dtype))[0]
        state.epochs_total, extending = planned_epochs(resume, args, dist, amp_dtypes=(saved_dtype, amp_dtype))
    error = ""
    if dist.is_main and args.recon_count > 0:
        try:
            check_recon_origin(val_ds, Path(args.recon_dir), args.recon_count, fresh=resume is None)
        except UserError as err:
            error = str(err)
    error = agree_on_error(error, dist)  # every rank stops, not only the one that checked
    if error:
        raise UserError(error)
    # -- the model
    model = prepare_model(args, arch, resume, device, dist, say, train_ds, gdn_fit)
    if dist.enabled:  # the same weights everywhere, but each rank its own quantisation noise and worker seeds
        seed_everything(args.seed + dist.rank)
    stride = int(getattr(unwrap(model), "downsampling_factor", 16))
    for what, crop in (("train", side), ("val", val_side)):
        if crop % stride:
            raise UserError(f"{what} crops are {crop}px, not a multiple of {arch['base_model']}'s stride {stride}")
    # -- loaders, optimisers, resumed state
    on_cuda = device.type == "cuda"
    train_loader = EpochLoader(train_ds, args.batch_size, args.num_workers, args.seed, dist, on_cuda, on_cuda)
    steps = len(train_loader) if not args.max_steps_per_epoch else min(len(train_loader), args.max_steps_per_epoch)
    if steps == 0:
        raise UserError(f"{len(train_ds)} train crops over {dist.world_size} process(es) make no batch of "
                        f"{args.batch_size}")
    tr = build_trainer(args, model, device, side, dist, steps, state, resume, extending, say)
    out = output_config(args, fingerprint, amp_dtype)
    kept = f"nothing was saved in {args.save_dir}"
    if resume is not None and out.last.resolve() == Path(args.resume).resolve():
        kept = f"{args.resume} is kept as it was (step {state.steps_run})"
    if arch["qat"] and resume is None:
        start_qat_phase(unwrap(model), args, say)
    val_batches = val_loader(val_ds, args.batch_size, args.num_workers, dist, on_cuda)
    banner = (f"training on {device} x{dist.world_size} | {len(train_ds)} train / {len(val_ds)} val crops of "
              f"{side}px | amp={args.amp} ({amp_dtype + ', ' + why if args.amp else 'fp32'}) | {steps} steps/epoch | "
              f"effective batch {args.batch_size * dist.world_size}")
    return Run(tr=tr, state=state, arch=arch, train_loader=train_loader, val_ds=val_ds, val_batches=val_batches,
               loop=loop_config(args, steps), out=out, kept=kept,
               replaces=dist.is_main and resume is None and args.overwrite, banner=banner)
