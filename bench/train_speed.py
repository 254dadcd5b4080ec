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
The recipe's extras that cost time are off (``--recon_count 0``); its val
pass still computes PSNR and MS-SSIM, and its checkpoints are fsynced.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch
from compressai.losses import RateDistortionLoss

from src.cli import StopRequest
from src.distributed import DistInfo
from src.engine import StepConfig, Trainer, TrainState, split_aux_parameters, training_step
from src.eval import synchronize
from src.images import center_crop_tensor
from src.losses import RecipeLoss
from src.model_factory import build_model, make_arch, quality_index
from src.precision import apply_local_fp32, autocast_context, make_grad_scaler
from src.run_logger import RunLogger
from src.sample_photos import skimage_photos
from src.schedule import build_schedule

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


def recipe_step_fn(model, device, amp: bool, criterion: RecipeLoss) -> Callable[[torch.Tensor], None]:
    """The engine's step; clipping at CompressAI's 1.0 on its loss scale (ours is 1/lmbda times larger)."""
    apply_local_fp32(model, "entropy")
    net, aux = split_aux_parameters(model)
    optimizer = torch.optim.Adam(net, lr=1e-4)
    clip = 1.0 / LMBDA if criterion.distortion == "mse" else 1.0
    tr = Trainer(model=model, criterion=criterion, optimizer=optimizer,
                 aux_optimizer=torch.optim.Adam(aux, lr=1e-3), scaler=make_grad_scaler(device.type, amp, "bf16"),
                 schedule=build_schedule(optimizer, "none", 1, 1, 1e-4),
                 autocast=autocast_context(device.type, amp, "bf16"),
                 device=device, dist=DistInfo(), monitor=None, logger=RunLogger(False, {}, "."), stop=StopRequest(),
                 config=StepConfig(max_grad_norm=clip, lambda_bpp=criterion.lambda_bpp))
    state = TrainState()
    sums = torch.zeros((), device=device)

    def step(x):
        nonlocal sums
        _, parts, verdict = training_step(tr, x, state)
        if not bool(verdict.skip):
            sums = sums + parts["total"].detach()
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
                                   RecipeLoss(loss_type="rd", lambda_bpp=1 / LMBDA, distortion="mse")),
            "recipe": recipe_step_fn(copy.deepcopy(base).to(device).train(), device, amp,
                                     RecipeLoss(0.4, "rd", 0.01)),
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
    print(f"$ {' '.join(cmd)}  > {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(cmd, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"error: exit code {code}; see {log}")
    return seconds


def compare_processes(args) -> None:
    """CompressAI's examples/train.py against the recipe's script: wall time of each whole process."""
    repo = Path(__file__).resolve().parents[1]
    work = Path(args.work_dir).resolve()
    crops = work / f"crops{args.crop}"
    subprocess.run([sys.executable, "-m", "scripts.coco_prepare", "--coco_dir", args.coco_dir, "--out_dir",
                    str(crops), "--crop_size", str(args.crop), "--crops_per_image", str(args.crops_per_image)],
                   cwd=repo, check=True, stdout=subprocess.DEVNULL)
    dataset = work / "compressai_dataset"  # CompressAI's ImageFolder wants train/ and test/
    dataset.mkdir(parents=True, exist_ok=True)
    for name, target in (("train", crops / "train"), ("test", crops / "val")):
        if not (dataset / name).exists():
            (dataset / name).symlink_to(target)
    common = ["--epochs", str(args.epochs), "--batch_size", str(args.batch), "--num_workers", str(args.workers),
              "--seed", "0"]
    theirs = [sys.executable, str(Path(args.compressai_train).resolve()), "-m", "bmshj2018-factorized", "-d",
              str(dataset), "-e", str(args.epochs), "--lambda", str(LMBDA), "--batch-size", str(args.batch),
              "--test-batch-size", str(args.batch), "--patch-size", str(args.crop), str(args.crop), "-n",
              str(args.workers), "--seed", "0", "--clip_max_norm", "1.0", "--save"]
    if args.device == "cuda":
        theirs.append("--cuda")
    ours = [sys.executable, "-m", "src.train_finetune_relu", "--coco_dir", str(crops), "--quality", "3",
            "--pretrained", "false", "--replace_parts", "none", "--train_scope", "all", "--loss_type", "rd",
            "--distortion", "mse", "--lambda_bpp", f"{1 / LMBDA:g}", "--max_grad_norm", f"{1 / LMBDA:g}",
            "--sched", "plateau", "--lr", "1e-4", "--recon_count", "0", "--log_every", "10",
            "--device", args.device, "--save_dir", str(work / "recipe_ckpt"), "--overwrite", "true",  # both runs
            *common]
    train_images = len(list((crops / "train").glob("*.png")))
    images = args.epochs * (train_images // args.batch) * args.batch
    print(f"whole process: {train_images} train crops of {args.crop}px, batch {args.batch}, {args.epochs} epochs, "
          f"{args.workers} workers, {args.device}; about {images} training images per run")
    runs = {"compressai fp32": (theirs, work / "compressai_run")}
    runs["recipe fp32"] = (ours + ["--amp", "false"], repo)
    runs["recipe bf16"] = (ours + ["--amp", "true", "--amp_dtype", "bf16"], repo)
    seconds = {}
    for name, (cmd, cwd) in runs.items():
        Path(cwd).mkdir(parents=True, exist_ok=True)
        seconds[name] = timed_process(cmd, Path(cwd), work / f"{name.replace(' ', '_')}.log")
    ref = seconds["compressai fp32"]
    print(f"{'run':<18}{'wall s':>9}{'vs CompressAI':>15}")
    for name, value in seconds.items():
        print(f"{name:<18}{value:>9.1f}{value / ref:>15.3f}")


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
    args = parser.parse_args()
    if args.compressai_train:
        if not args.coco_dir:
            parser.error("--compressai_train needs --coco_dir")
        compare_processes(args)
    else:
        compare_steps(args)


if __name__ == "__main__":
    main()
