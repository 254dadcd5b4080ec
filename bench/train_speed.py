"""Training throughput: the recipe against CompressAI's own example loop, on equal work.

    python -m bench.train_speed                 # steps: 128 px, batch 8, q=3 (CPU, a few minutes)
    python -m bench.train_speed --scale full    # steps: 224 px, batch 16 (meant for a GPU)
    python -m bench.train_speed --compressai_train CompressAI/examples/train.py --coco_dir ../shared/data/minicoco

**Steps** (default): the same GDN model (bmshj2018-factorized, all parameters
trained, as CompressAI's example trains it), the same real-photo batches
(preloaded, so data loading is not measured) and the same optimizers,
alternating in rounds so that machine noise hits every loop alike.

- plain: CompressAI's examples/train.py step: forward, RateDistortionLoss
  (lmbda * 255^2 * MSE + bpp), backward, clip, step, aux-loss step.
- loop: src.engine's training_step (forward, loss, backward, clip, agreement, step) with
  ``--distortion mse`` (CompressAI's objective): local-FP32 entropy model, the
  per-step skip/stop agreement, clip, step, aux step -- the loop's own extras.
- recipe: the same with the recipe's default loss (FP32 L1 + 5-scale MS-SSIM + bpp).

**Whole process** (``--compressai_train PATH``): CompressAI's
``examples/train.py`` run as it is (a snapshot of CompressAI's repository) and
the recipe's ``src.train_finetune_relu`` with the same model, objective
(``--distortion mse --lambda_bpp 1/lmbda``, clip scaled alike), data (the
same prepared crops, whole epochs, patch = crop), batch, workers, epochs and
plateau schedule, fp32 and bf16; wall time of each process, start-up included.
The recipe writes what it always writes (recon PNGs of 8 val crops each
epoch with their rate records, the recon sheet at the end, fsynced
checkpoints) and its val pass computes PSNR and MS-SSIM. The runs alternate
over ``--process_rounds`` rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from compressai.losses import RateDistortionLoss

from src.cli import str2bool
from src.codec.roundtrip import synchronize
from src.commands import REPO, python, run
from src.engine import TrainState, build_trainer, setup, training_step
from src.images import center_crop_tensor
from src.model_factory import build_model, make_arch, quality_index
from src.precision import autocast_context
from src.replace_gdn import split_aux_parameters
from src.sample_photos import skimage_photos
from src.train_args import compressai_objective, get_args_parser, validate_args

SCALES = {"smoke": (64, 2), "small": (128, 8), "full": (224, 16)}


def photo_batches(crop: int, batch: int, count: int, device: torch.device) -> List[torch.Tensor]:
    """Batches of real photo crops (scikit-image's sample photos), preloaded on the device."""
    crops = []
    for path in skimage_photos():
        crops.append(center_crop_tensor(path, (crop, crop))[0])
    stacked = torch.stack(crops)
    return [stacked[torch.arange(i, i + batch) % len(stacked)].to(device) for i in range(count)]


LMBDA = 0.01  # CompressAI's examples/train.py default


def plain_step_fn(model, device, amp: bool) -> Callable[[torch.Tensor], None]:
    net, aux = split_aux_parameters(model)
    optimizer, aux_optimizer = torch.optim.Adam(net, lr=1e-4), torch.optim.Adam(aux, lr=1e-3)
    criterion = RateDistortionLoss(lmbda=LMBDA)
    autocast = autocast_context(device.type, amp, "bf16")

    def step(x):
        optimizer.zero_grad()
        aux_optimizer.zero_grad()
        with autocast():
            out = model(x)
        loss = criterion(out, x)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.aux_loss().backward()
        aux_optimizer.step()
    return step


def recipe_step_fn(model, device, amp: bool, loss_flags: List[str], crop: int) -> Callable[[torch.Tensor], None]:
    """The engine's step, built by ``src.engine.setup`` from the training script's own flags (``loss_flags``)."""
    argv = ["--coco_dir", "-", "--device", device.type, "--replace_parts", "none", "--train_scope", "all",
            "--sched", "none", "--amp", str(amp).lower(), "--amp_dtype", "bf16", *loss_flags]
    args = get_args_parser("the engine's step").parse_args(argv)
    validate_args(args)
    quiet = lambda *a, **k: None  # noqa: E731
    setup.configure_model(model, args, make_arch(quality=args.quality, replace="none"), device, quiet)
    tr = build_trainer(args, model, device, side=crop, say=quiet)
    state = TrainState()
    zero = torch.zeros((), device=device)
    sums = zero.clone()

    def step(x):
        nonlocal sums
        _, parts, verdict = training_step(tr, x, state)
        sums = sums + torch.where(verdict.skip, zero, parts["total"].detach())  # as the loop sums: on the device
        state.steps_run += 1
    return step


def timed(step, batches, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for x in batches:
        step(x)
    synchronize(device)
    return time.perf_counter() - start


def compare_steps(args) -> None:
    device = torch.device(args.device)
    crop, batch = SCALES[args.scale]
    batches = photo_batches(crop, batch, args.steps, device)
    torch.manual_seed(0)
    base = build_model(make_arch(quality=args.quality, replace="none"))
    print(f"steps: GDN bmshj2018-factorized q={args.quality}, {crop}px, batch {batch}, {args.rounds} rounds x {args.steps} "
          f"steps per loop, {device}, torch threads {torch.get_num_threads()}")
    print("img/s of: plain = CompressAI's example step; loop = recipe engine, --distortion mse; "
          "recipe = recipe engine, its L1 + MS-SSIM loss")
    print(f"{'precision':<10}{'plain':>9}{'loop':>9}{'recipe':>9}{'loop/plain':>12}{'recipe/plain':>14}")
    for amp in (False, True):
        steps = {
            "plain": plain_step_fn(copy.deepcopy(base).to(device).train(), device, amp),
            "loop": recipe_step_fn(copy.deepcopy(base).to(device).train(), device, amp,
                                   compressai_objective(1 / LMBDA), crop),
            "recipe": recipe_step_fn(copy.deepcopy(base).to(device).train(), device, amp,
                                     ["--loss_type", "rd", "--lambda_bpp", "0.01"], crop),
        }
        seconds = dict.fromkeys(steps, 0.0)
        for step in steps.values():
            timed(step, batches[:2], device)
        for _ in range(args.rounds):
            for name, step in steps.items():
                seconds[name] += timed(step, batches, device)
        rate = {name: args.rounds * args.steps * batch / s for name, s in seconds.items()}
        print(f"{'bf16' if amp else 'fp32':<10}{rate['plain']:>9.2f}{rate['loop']:>9.2f}{rate['recipe']:>9.2f}"
              f"{rate['loop'] / rate['plain']:>12.3f}{rate['recipe'] / rate['plain']:>14.3f}")


def timed_process(cmd: List[str], cwd: Path, log: Path) -> float:
    """Wall seconds of one whole process (start-up, imports and exit included)."""
    start = time.perf_counter()
    run(cmd, log, cwd=cwd)
    return time.perf_counter() - start


def compare_processes(args) -> None:
    """CompressAI's examples/train.py against the recipe's script: wall time of each whole process.

    The runs alternate (A, B, C, A, B, C, ...) for ``--process_rounds`` rounds so that load drift on a shared
    machine hits each alike; each round's ratio is printed, then the medians.
    """
    work = Path(args.work_dir).resolve()
    crops = work / f"crops{args.crop}"
    run(python("scripts.coco_prepare", "--coco_dir", args.coco_dir, "--out_dir", str(crops), "--crop_size",
               str(args.crop), "--crops_per_image", str(args.crops_per_image)), work / "prepare.log")
    dataset = work / "compressai_dataset"  # CompressAI's ImageFolder wants train/ and test/
    dataset.mkdir(parents=True, exist_ok=True)
    for name, target in (("train", crops / "train"), ("test", crops / "val")):
        if not (dataset / name).exists():
            (dataset / name).symlink_to(target)
    theirs = [sys.executable, str(Path(args.compressai_train).resolve()), "-m", "bmshj2018-factorized", "-d",
              str(dataset), "-e", str(args.epochs), "--lambda", str(LMBDA), "--batch-size", str(args.batch),
              "--test-batch-size", str(args.batch), "--patch-size", str(args.crop), str(args.crop), "-n",
              str(args.workers), "--seed", "0", "--clip_max_norm", "1.0", "--save"]
    if args.device == "cuda":
        theirs.append("--cuda")
    # The recipe as a user runs it, recon PNGs, their rate records and the recon sheet included (its defaults).
    ours = recipe_command(args, crops, work)
    train_images = len(list((crops / "train").glob("*.png")))
    images = args.epochs * (train_images // args.batch) * args.batch
    print(f"whole process: {train_images} train crops of {args.crop}px, batch {args.batch}, {args.epochs} epochs, "
          f"{args.workers} workers, {args.device}, recipe --recon_count {args.recon_count}; about {images} training "
          f"images per run; {args.process_rounds} alternating rounds")
    runs = {"compressai fp32": (theirs, work / "compressai_run"),
            "recipe fp32": (ours + ["--amp", "false"], REPO)}
    if args.bf16:
        runs["recipe bf16"] = (ours + ["--amp", "true", "--amp_dtype", "bf16"], REPO)
    seconds: Dict[str, List[float]] = {name: [] for name in runs}
    for round_ in range(args.process_rounds):
        for name, (cmd, cwd) in runs.items():
            Path(cwd).mkdir(parents=True, exist_ok=True)
            seconds[name].append(timed_process(cmd, Path(cwd), work / f"{name.replace(' ', '_')}_{round_ + 1}.log"))
        ref = seconds["compressai fp32"][-1]
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {values[-1]:.1f} s ({values[-1] / ref:.3f})"
                                              for name, values in seconds.items()), flush=True)
    ref = statistics.median(seconds["compressai fp32"])
    print(f"{'run':<18}{'median wall s':>15}{'vs CompressAI':>15}{'per-round ratios':>40}")
    for name, values in seconds.items():
        ratios = " ".join(f"{v / r:.3f}" for v, r in zip(values, seconds["compressai fp32"]))
        print(f"{name:<18}{statistics.median(values):>15.1f}{statistics.median(values) / ref:>15.3f}{ratios:>40}")


# (label, module path suffix, function, caller function or None): the parts of a recipe run the breakdown names
BREAKDOWN = [
    ("training steps (forward, loss, backward, clip, step, aux step)", "engine/step.py", "training_step", None),
    ("per-step train PSNR", "losses.py", "psnr_per_image", "train_one_epoch"),
    ("batches to float on the device", "data.py", "to_unit_float", "train_one_epoch"),
    ("train loader (next batch)", "dataloader.py", "__next__", "<built-in method builtins.next>"),
    ("val pass (forward, loss, PSNR, MS-SSIM, bpp)", "engine/loop.py", "evaluate", None),
    ("  of which val MS-SSIM", "losses.py", "msssim_per_image", "evaluate"),
    ("check before each save (weights, codable latents)", "engine/loop.py", "unfit_to_save", None),
    ("checkpoint writes (update(force=True), fsynced last.pt, best_*.pt links)", "engine/state.py",
     "save_epoch_checkpoints", None),
    ("recon PNGs and rate records per epoch", "engine/loop.py", "dump_recon", None),
    ("recon sheet at the end (report.png)", "engine/loop.py", "write_recon_report", None),
    ("  of which drawing it (matplotlib import included)", "recon.py", "draw_sheet", None),
    ("setup (data, model, optimisers, loaders)", "engine/setup.py", "build_run", None),
]


def breakdown(args) -> None:
    """One recipe run (the whole-process command, fp32) under cProfile: where its wall time goes."""
    import pstats

    work = Path(args.work_dir).resolve()
    crops = work / f"crops{args.crop}"
    run(python("scripts.coco_prepare", "--coco_dir", args.coco_dir, "--out_dir", str(crops), "--crop_size",
               str(args.crop), "--crops_per_image", str(args.crops_per_image)), work / "prepare.log")
    stats = work / "recipe_fp32.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", *recipe_command(args, crops, work)[2:],
           "--amp", "false"]
    start = time.perf_counter()
    run(cmd, work / "breakdown.log")
    wall = time.perf_counter() - start
    table = pstats.Stats(str(stats)).stats
    total = max(ct for (_, _, name), (_, _, _, ct, _) in table.items() if name == "<module>")

    def seconds(suffix: str, function: str, caller: Optional[str]) -> float:
        found = 0.0
        for (path, _, name), (_, _, _, ct, callers) in table.items():
            if path.endswith(suffix) and name == function:
                found += ct if caller is None else sum(c[3] for (_, _, who), c in callers.items() if who == caller)
        return found

    main_s = seconds("cli.py", "run_cli", None)
    print(f"recipe fp32 under cProfile: {wall:.1f} s wall, {total:.1f} s profiled; {total - main_s:.1f} s before "
          "main() (imports)")
    named = 0.0
    for label, suffix, function, caller in BREAKDOWN:
        value = seconds(suffix, function, caller)
        named += value if not label.startswith("  ") else 0.0
        print(f"{label:<78}{value:>8.2f} s{100 * value / total:>7.1f} %")
    rest = main_s - named
    print(f"{'the rest of main() (parsing, claims, summary, tqdm)':<78}{rest:>8.2f} s{100 * rest / total:>7.1f} %")


def recipe_command(args, crops: Path, work: Path) -> List[str]:
    """The recipe's training command of the whole-process comparison (without --amp)."""
    return python("src.train_finetune_relu", "--coco_dir", str(crops), "--quality", "3", "--pretrained", "false",
                  "--replace_parts", "none", "--train_scope", "all", *compressai_objective(1 / LMBDA),
                  "--sched", "plateau", "--lr", "1e-4", "--log_every", "10", "--device", args.device,
                  "--save_dir", str(work / "recipe_ckpt"), "--recon_dir", str(work / "recipe_recon"),
                  "--recon_count", str(args.recon_count), "--overwrite", "true",  # every round replaces the last
                  "--epochs", str(args.epochs), "--batch_size", str(args.batch), "--num_workers", str(args.workers),
                  "--seed", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per loop per round")
    parser.add_argument("--quality", type=quality_index, default=3, help="model size (steps mode)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = parser.add_argument_group("whole process (--compressai_train)")
    g.add_argument("--compressai_train", default=None, help="path to CompressAI's examples/train.py")
    g.add_argument("--coco_dir", default=None, help="COCO root (train2017/, val2017/) for the crops")
    g.add_argument("--work_dir", default="bench_out/train_speed")
    g.add_argument("--crop", type=int, default=128)
    g.add_argument("--crops_per_image", type=int, default=4)
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--epochs", type=int, default=2)
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--recon_count", type=int, default=8, help="the recipe's recon PNGs per epoch (its default)")
    g.add_argument("--process_rounds", type=int, default=1, help="alternating rounds of the whole-process runs")
    g.add_argument("--bf16", type=str2bool, default=True, help="also time the recipe in bf16")
    g.add_argument("--breakdown", action="store_true",
                   help="instead: one recipe fp32 run under cProfile, its wall time by part (needs --coco_dir)")
    args = parser.parse_args()
    if args.breakdown:
        if not args.coco_dir:
            parser.error("--breakdown needs --coco_dir")
        breakdown(args)
    elif args.compressai_train:
        if not args.coco_dir:
            parser.error("--compressai_train needs --coco_dir")
        compare_processes(args)
    else:
        compare_steps(args)


if __name__ == "__main__":
    main()
