"""The flags both training scripts share, and the cross-flag rules argparse cannot express."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from src.cli import UserError, str2bool
from src.losses import DISTORTIONS, LOSS_TYPES, ZOO_LAMBDA_BPP
from src.model_factory import BASE_MODELS, describe_model, quality_index
from src.npu_blocks import GDNishLiteDec, GDNishLiteEnc
from src.precision import AMP_DTYPE_CHOICES, LOCAL_FP32_POLICIES
from src.quant.scheme import INTERFACES, PLACEMENTS, PRECISIONS as QAT_PRECISIONS, RANGE_METHODS, SCALE_MODES
from src.replace_gdn import REPLACE_MODES, TRAIN_SCOPES
from src.schedule import SCHEDULES, check_schedule


class _RemovedFlag(argparse.Action):
    """A flag that no longer exists: hidden from ``--help``, one line saying what replaces it when used."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was removed: {self.replacement}")


def show_every_default(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give each visible flag a help line, so that ``--help`` shows every default (users read them there first).

    argparse prints no line, hence no default, for a flag without help text.
    """
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)" if not action.required else "required"
    return parser


# ---------------------------------------------------------------- arguments

RAW_CROP_SIZE = 224  # --crop_size of raw COCO when not given

def get_args_parser(description: str, save_dir: str = "./checkpoints", recon_dir: str = "./recon",
                    replace_parts: str = "encoder") -> argparse.ArgumentParser:
    """The flags both training scripts share, grouped by concern (``--help`` reads as a contents page)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Data")
    g.add_argument("--coco_dir", required=True,
                   help="prepared crops (with train/ val/) when --use_prepared true, else the COCO root")
    g.add_argument("--use_prepared", type=str2bool, default=True, help="read scripts.coco_prepare output")
    g.add_argument("--crop_size", type=int, default=None,
                   help=f"crop side for raw COCO (--use_prepared false; {RAW_CROP_SIZE} when not given); prepared "
                        "crops keep the size they were made at (a --crop_size that differs is refused)")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--num_workers", type=int, default=4)
    g = p.add_argument_group("Model")
    g.add_argument("--model", default="bmshj2018-factorized", choices=BASE_MODELS, help="CompressAI zoo model")
    g.add_argument("--quality", type=quality_index, default=3, metavar="{1..8}",
                   help="CompressAI quality index")
    g.add_argument("--metric", default="mse", choices=("mse", "ms-ssim"), help="which zoo weights")
    g.add_argument("--pretrained", type=str2bool, default=True, help="start from CompressAI's zoo weights")
    g.add_argument("--base_checkpoint", default=None,
                   help="start from local weights: a zoo .pth.tar or a checkpoint of this project")
    g.add_argument("--replace_parts", default=replace_parts, choices=sorted(REPLACE_MODES),
                   help="where GDN/IGDN is replaced (none = GDN control)")
    g.add_argument("--train_scope", default="replaced", choices=TRAIN_SCOPES,
                   help="replaced = the whole transforms that hold a swap (g_a and/or g_s, all their layers); "
                        "replaced+hyper = those plus h_a/h_s and the entropy model; all = everything")
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
    g.add_argument("--resume", default=None, help="continue from this last.pt (with the flags of that run)")
    g.add_argument("--extend_epochs", type=int, default=0,
                   help="with --resume of a finished run: train this many more epochs; cosine/onecycle are rebuilt "
                        "for the new length and fast-forwarded to where the run stands")
    g = p.add_argument_group("Loss")
    g.add_argument("--loss_type", default="recon", choices=LOSS_TYPES,
                   help="recon = distortion only; rd = distortion + lambda_bpp * bpp")
    g.add_argument("--distortion", default="l1_msssim", choices=DISTORTIONS,
                   help="l1_msssim = a*L1 + (1-a)*(1-MS-SSIM); mse = 255^2*MSE, CompressAI's objective")
    g.add_argument("--alpha_l1", type=float, default=0.4, help="a in a*L1 + (1-a)*(1-MS-SSIM)")
    g.add_argument("--lambda_bpp", type=float, default=0.01,
                   help="rate weight for --loss_type rd (with --distortion mse, 1/lmbda of CompressAI: "
                        "q1..q8 = 556, 286, 149, 76.9, 40, 20.7, 10.7, 5.56)")
    g = p.add_argument_group("Precision")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--amp", type=str2bool, default=True)
    g.add_argument("--amp_dtype", default="auto", choices=AMP_DTYPE_CHOICES,
                   help="auto = bf16 where the device runs it natively (CPU, CUDA >= 8.0), else fp16 + GradScaler")
    g.add_argument("--local_fp32", default="entropy", choices=LOCAL_FP32_POLICIES,
                   help="modules that run in FP32 under autocast")
    g.add_argument("--local_fp32_custom", default="", help="comma-separated class-name parts (--local_fp32 custom)")
    g.add_argument("--overflow_check", type=str2bool, default=False)
    g.add_argument("--overflow_tol", type=float, default=1e8)
    g.add_argument("--max_bad_steps", type=int, default=20,
                   help="without --overflow_check: stop after this many non-finite steps in a row (each is skipped)")
    g.add_argument("--amp_warmup_steps", action=_RemovedFlag,
                   replacement="use --lr_warmup_steps (LR warmup), --amp_dtype bf16 (no loss scale to warm up) "
                               "or --local_fp32 (keep fragile modules in FP32)")
    g = p.add_argument_group("Speed (GPU path)")
    g.add_argument("--fused_optimizer", default="auto", choices=("auto", "true", "false"),
                   help="fused Adam/AdamW; it also lets bf16/fp32 runs skip bad steps on the device without a host "
                        "sync per step (auto = on for CUDA)")
    g.add_argument("--channels_last", type=str2bool, default=False,
                   help="NHWC memory format for the model and the batches (for tensor-core convolutions on CUDA)")
    g.add_argument("--compile", type=str2bool, default=False,
                   help="torch.compile g_a and g_s in place (the entropy model stays eager)")
    g = p.add_argument_group("Quantisation-aware training (g_a and g_s; the entropy model stays float)")
    g.add_argument("--qat", type=str2bool, default=False,
                   help="a QAT phase after float training (start from --base_checkpoint FLOAT.pt of this "
                        "architecture): g_a/g_s round where their INT8 graph rounds, weights INT8 per output channel, "
                        "activation scales from PTQ's calibration on whole photos (src/quant/qat.py)")
    g.add_argument("--qat_precision", default="w8a8", choices=QAT_PRECISIONS,
                   help="INT8 profile (src/quant/ptq.py): w8a8 = every activation 8-bit; a16w8 = 16-bit main path")
    g.add_argument("--qat_scales", default="learned", choices=SCALE_MODES,
                   help="learned = LSQ-train the 8-bit scales (in log space) from the calibrated ones (measured "
                        "better, docs/qat_study.md); frozen = keep the calibrated scales")
    g.add_argument("--qat_calib_dir", default=None,
                   help="whole photos the scales are calibrated on (default: COCO_DIR/train2017; never crops)")
    g.add_argument("--qat_calib_count", type=int, default=20, help="calibration photos used (sorted by name)")
    g.add_argument("--qat_range", default="mse", choices=RANGE_METHODS,
                   help="how each activation's range is chosen from the calibration histograms (src/quant/ptq.py)")
    g.add_argument("--qat_placement", default="graph", choices=PLACEMENTS,
                   help="ablation only: double = also round each conv's output before its ReLU6 (the old QAT; the "
                        "exported graph rounds once, after it)")
    g.add_argument("--qat_interface", default="symbols", choices=INTERFACES,
                   help="ablation only: latent = also put g_a's output y on an 8-bit grid (the old QAT; the "
                        "exported graph hands over the symbols at scale 1)")
    g.add_argument("--qat_calib_steps", action=_RemovedFlag,
                   replacement="QAT calibrates on whole photos: --qat_calib_dir DIR --qat_calib_count N")
    g.add_argument("--qat_freeze_after", action=_RemovedFlag,
                   replacement="the scales are frozen or learned for the whole phase: --qat_scales frozen|learned")
    g = p.add_argument_group("Output")
    g.add_argument("--save_dir", default=save_dir)
    g.add_argument("--recon_dir", default=recon_dir)
    g.add_argument("--overwrite", type=str2bool, default=False,
                   help="let a fresh run replace the run already in --save_dir/--recon_dir (its checkpoints, recon "
                        "folders and sheet are removed at start); without it such folders are refused")
    g.add_argument("--recon_every", type=int, default=1, help="epochs between recon dumps (and the last)")
    g.add_argument("--recon_count", type=int, default=8)
    g.add_argument("--log_every", type=int, default=50, help="steps between progress/W&B updates")
    g.add_argument("--wandb", type=str2bool, default=False, help="log to W&B (project: $WANDB_PROJECT)")
    return show_every_default(p)


def get_npu_args_parser() -> argparse.ArgumentParser:
    """The NPU script's parser: the shared flags with its own defaults, plus the blocks' options."""
    parser = get_args_parser("Fine-tune bmshj2018_factorized with GDN/IGDN replaced by GDNishLite blocks.",
                             save_dir="./checkpoints_npu", recon_dir="./recon_npu", replace_parts="all")
    g = parser.add_argument_group("NPU blocks")
    for option in GDNishLiteEnc.OPTIONS + GDNishLiteDec.OPTIONS:  # each block lists its own (src/npu_blocks.py)
        g.add_argument(f"--{option.flag}", type=str2bool if option.type is bool else option.type,
                       default=option.default, help=option.help)
    g.add_argument("--init_from_gdn", type=str2bool, default=False,
                   help="fit each block to the GDN/IGDN it replaces (block-wise regression) before fine-tuning")
    g.add_argument("--gdn_fit_steps", type=int, default=300, help="regression steps per block")
    g.add_argument("--gdn_fit_images", type=int, default=16, help="train crops whose activations are fitted")
    return show_every_default(parser)


def check_block_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The NPU blocks' rules (and ``--init_from_gdn``'s), as one-line argparse errors naming the flag.

    Without a residual a block must start as the identity some other way: the
    encoder carries +x and -x through its ReLU6 on 2C hidden channels (so
    ``--enc_t`` >= 2), the decoder's gain must be able to equal 1
    (``--dec_gmin`` < 1 < ``--dec_gmax``).
    """
    if args.enc_t <= 0:
        parser.error(f"--enc_t must be > 0, got {args.enc_t:g}")
    if not args.enc_residual and args.enc_t < 2:
        parser.error(f"--enc_t must be >= 2 with --enc_residual false (identity init carries +x and -x on 2C "
                     f"channels), got {args.enc_t:g}")
    for flag in ("enc_kdw", "dec_k"):
        value = getattr(args, flag)
        if value < 1 or value % 2 == 0:
            parser.error(f"--{flag} must be a positive odd kernel size (1, 3, 5, ...), got {value}")
    if args.dec_gmin < 0 or args.dec_gmin >= args.dec_gmax:
        parser.error(f"--dec_gmin must be >= 0 and < --dec_gmax, got [{args.dec_gmin:g}, {args.dec_gmax:g}]")
    if not args.dec_residual and not args.dec_gmin < 1 < args.dec_gmax:
        parser.error(f"--dec_residual false needs --dec_gmin < 1 < --dec_gmax (identity init needs gain 1), "
                     f"got [{args.dec_gmin:g}, {args.dec_gmax:g}]")
    for flag in ("gdn_fit_steps", "gdn_fit_images"):
        value = getattr(args, flag)
        if value < 0 or (args.init_from_gdn and value < 1):
            parser.error(f"--{flag} must be >= 1 with --init_from_gdn true (and never negative), got {value}")
    for cls, kwargs in zip((GDNishLiteEnc, GDNishLiteDec), block_kwargs(args)):
        try:  # whatever else a block refuses, in its own words with its options named as flags
            cls(1, **kwargs)
        except ValueError as err:
            message = str(err)
            for option in cls.OPTIONS:
                message = re.sub(rf"\b{option.kwarg}\b", f"--{option.flag}", message)
            parser.error(message)


def block_kwargs(args: argparse.Namespace) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(enc_kwargs, dec_kwargs) for ``replace_gdn_with_npu`` (src/replace_gdn_npu.py) from the NPU flags."""
    return tuple({o.kwarg: getattr(args, o.flag) for o in cls.OPTIONS} for cls in (GDNishLiteEnc, GDNishLiteDec))


def replacement_built_by(build_model: Callable[[argparse.Namespace], nn.Module],
                         args: argparse.Namespace) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """``(replace, enc_kwargs, dec_kwargs)`` for ``run_training``, read off the network a script's ``build_model``.

    The network is described by its modules (``src.model_factory.describe_model``),
    so whatever swap the script's code does is what trains and what every
    checkpoint's ``arch`` says. One line when the network cannot be described,
    or when it swaps other transforms than ``--replace_parts`` names (the flag
    is what ``--train_scope`` and the saved flags read).
    """
    try:
        arch = describe_model(build_model(args), args.model, args.quality, args.metric)
    except ValueError as err:
        raise UserError(f"build_model: {err}") from None
    if arch["replace_parts"] != args.replace_parts:
        did = (f"swaps GDN for {arch['replace']} in {arch['replace_parts']}" if arch["replace"] != "none"
               else "leaves every GDN in place")
        raise UserError(f"build_model {did} but --replace_parts is {args.replace_parts}: pass --replace_parts "
                        f"{arch['replace_parts']}, or swap with mode=args.replace_parts")
    return arch["replace"], arch["enc_kwargs"], arch["dec_kwargs"]


def validate_args(args: argparse.Namespace) -> None:
    """Cross-flag rules argparse cannot express; each failure is one line.

    Resolves ``--crop_size`` of raw COCO to its default (prepared crops have
    their own size, which ``src.data.check_datasets`` reads).
    """
    if args.local_fp32 == "custom" and not args.local_fp32_custom.strip():
        raise UserError("--local_fp32 custom needs --local_fp32_custom NAME[,NAME...] (class-name parts)")
    try:
        check_schedule(args.sched, args.lr_warmup_steps)
    except ValueError as err:
        raise UserError(str(err)) from None
    for flag in ("epochs", "batch_size", "recon_every", "log_every", "max_bad_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1")
    if args.extend_epochs and not args.resume:
        raise UserError("--extend_epochs needs --resume CHECKPOINT (the finished run to lengthen)")
    if args.qat:
        check_qat_flags(args)
    for flag in ("num_workers", "max_steps_per_epoch", "recon_count", "lr_warmup_steps", "extend_epochs"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0")
    if not 0.0 <= args.alpha_l1 <= 1.0:
        raise UserError("--alpha_l1 must be in [0, 1]")
    for flag, lowest, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("lambda_bpp", 0.0, False),
                                 ("overflow_tol", 0.0, True)):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < lowest or (strict and value == lowest):
            raise UserError(f"--{flag} must be a finite number {'>' if strict else '>='} {lowest:g}, got {value:g}")
    if math.isnan(args.max_grad_norm):
        raise UserError("--max_grad_norm must be a number (<= 0 disables clipping), got nan")
    if not 0.0 < args.onecycle_pct_start < 1.0:
        raise UserError(f"--onecycle_pct_start must be in (0, 1) (the share of steps spent raising the LR), "
                        f"got {args.onecycle_pct_start:g}")
    if args.crop_size is None and not args.use_prepared:
        args.crop_size = RAW_CROP_SIZE
    if args.crop_size is not None and args.crop_size < 1:
        raise UserError(f"--crop_size must be >= 1, got {args.crop_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available (use --device cpu or auto)")
    if args.base_checkpoint and args.resume:
        raise UserError("--base_checkpoint and --resume exclude each other (resume restores everything)")


def check_qat_flags(args: argparse.Namespace) -> None:
    """``--qat true``: a phase after float training, calibrated on whole photos (``--qat_calib_dir`` resolved here)."""
    if not args.base_checkpoint and not args.resume:
        raise UserError("--qat true is a phase after float training: start it from a float checkpoint of this "
                        "architecture (--base_checkpoint FLOAT.pt), or --resume a QAT run")
    if args.qat_calib_count < 1:
        raise UserError("--qat_calib_count must be >= 1: the scales are calibrated on whole photos")
    if args.qat_calib_dir is None:
        default = Path(args.coco_dir) / "train2017"
        if not default.is_dir():
            raise UserError(f"--qat true calibrates on whole photos and {default} does not exist (prepared crops "
                            "are not whole photos): pass --qat_calib_dir DIR")
        args.qat_calib_dir = str(default)


# Flags that change what a run computes: resuming with another value would
# silently give another schedule, other samples or another objective.
RUN_DEFINING_FLAGS = ("epochs", "extend_epochs", "sched", "lr", "lr_warmup_steps", "onecycle_pct_start", "batch_size",
                      "max_steps_per_epoch", "seed", "loss_type", "distortion", "alpha_l1", "lambda_bpp",
                      "train_scope", "amp", "amp_dtype", "optimizer", "weight_decay", "max_grad_norm",
                      "use_prepared", "crop_size", "qat", "qat_precision", "qat_scales", "qat_calib_dir",
                      "qat_calib_count", "qat_range", "qat_placement", "qat_interface")
LENGTH_FLAGS = ("epochs", "extend_epochs")


def resume_flag_changes(saved: Dict[str, Any], args: argparse.Namespace, extending: bool,
                        saved_world_size: int, world_size: int,
                        amp_dtypes: Optional[Tuple[str, str]] = None) -> List[str]:
    """``--flag old -> new`` for each run-defining flag that differs from the saved run.

    When a finished run is extended (``--extend_epochs``), its length flags
    may differ: the new length is the saved one plus the extension.
    ``amp_dtypes`` (saved, current), as resolved: ``--amp_dtype`` is compared
    by what it runs, so ``auto`` and ``bf16`` are the same where auto is bf16.
    ``--crop_size`` only matters to raw COCO: prepared crops have their own
    size (the data fingerprint covers them).
    """
    changes = []
    for flag in RUN_DEFINING_FLAGS:
        if flag not in saved or (extending and flag in LENGTH_FLAGS):
            continue
        if flag == "crop_size" and saved.get("use_prepared", True):
            continue
        old, new = saved[flag], getattr(args, flag)
        if flag == "amp_dtype" and amp_dtypes is not None:
            if amp_dtypes[0] != amp_dtypes[1]:
                changes.append(f"--amp_dtype {old} ({amp_dtypes[0]}) -> {new} ({amp_dtypes[1]})")
            continue
        if old != new:
            changes.append(f"--{flag} {old} -> {new}")
    if saved_world_size != world_size:
        changes.append(f"world size {saved_world_size} -> {world_size} processes")
    return changes


# CompressAI's objective, ``lmbda * 255^2 * MSE + bpp``, on the recipe's scale (``--lambda_bpp L = 1 / lmbda``) with
# gradients clipped where ``examples/train.py`` clips them (its 1.0 on a loss L times larger): the demo's and the
# benches' one spelling of it.
def compressai_objective(lambda_bpp: float) -> List[str]:
    """CompressAI's training objective as the recipe's flags, at ``lambda_bpp`` (= 1 / CompressAI's lmbda)."""
    lam = f"{lambda_bpp:.6g}"
    return ["--loss_type", "rd", "--distortion", "mse", "--lambda_bpp", lam, "--max_grad_norm", lam]


def zoo_objective(quality: int) -> List[str]:
    """``compressai_objective`` at the trade-off CompressAI's zoo model of ``quality`` was trained with."""
    return compressai_objective(ZOO_LAMBDA_BPP[quality])
