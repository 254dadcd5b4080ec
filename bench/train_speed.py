"""Training-step throughput: the recipe's loop against CompressAI's plain example loop.

    python -m bench.train_speed                 # small: 128 px, batch 8, q=3 (CPU, a few minutes)
    python -m bench.train_speed --scale full    # 224 px, batch 16 (meant for a GPU)

Both loops run the same model (ReLU encoder, all parameters trained), the same
real-photo batches (preloaded, so data loading is not measured) and the same
optimizers, alternating in rounds so that machine noise hits both alike.

- plain: CompressAI's examples/train.py step: forward, RateDistortionLoss
  (lambda * 255^2 * MSE + bpp), backward, clip, step, aux-loss step.
- loop: src.engine's train_step / agree_to_skip_or_stop / apply_update with
  CompressAI's loss: local-FP32 entropy model, the per-step skip/stop
  agreement, clip, step, aux step -- the cost of the loop's own extras.
- recipe: the same with the recipe's loss (FP32 L1 + 5-scale MS-SSIM + bpp).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable, List

import torch
from compressai.losses import RateDistortionLoss
from torchvision.transforms.functional import pil_to_tensor

from src.distributed import DistInfo
from src.engine import Trainer, TrainState, agree_to_skip_or_stop, apply_update, split_aux_parameters, train_step
from src.images import center_crop_box, load_rgb, upscale_to_fit
from src.losses import RecipeLoss
from src.model_factory import build_model, make_arch
from src.precision import apply_local_fp32, autocast_context, make_grad_scaler
from src.replace_gdn import set_trainable_parts
from src.run_logger import RunLogger
from src.sample_photos import skimage_photos
from src.schedule import build_schedule
from src.stop_signals import StopRequest

SCALES = {"small": (128, 8), "full": (224, 16)}


def photo_batches(crop: int, batch: int, count: int, device: torch.device) -> List[torch.Tensor]:
    """Batches of real photo crops (scikit-image's sample photos), preloaded on the device."""
    crops = []
    for path in skimage_photos():
        img = load_rgb(path)
        img = upscale_to_fit(img, crop) if min(img.size) < crop else img
        crops.append(pil_to_tensor(img.crop(center_crop_box(*img.size, crop))).float() / 255)
    stacked = torch.stack(crops)
    return [stacked[torch.arange(i, i + batch) % len(stacked)].to(device) for i in range(count)]


def plain_step_fn(model, device, amp: bool) -> Callable[[torch.Tensor], None]:
    net, aux = split_aux_parameters(model)
    optimizer, aux_optimizer = torch.optim.Adam(net, lr=1e-4), torch.optim.Adam(aux, lr=1e-3)
    criterion = RateDistortionLoss(lmbda=0.01)
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


class CompressAILoss(torch.nn.Module):
    """CompressAI's RateDistortionLoss behind the recipe's criterion interface (parts dict with 'total')."""

    def __init__(self):
        super().__init__()
        self.rd = RateDistortionLoss(lmbda=0.01)

    def forward(self, output, x):
        return {"total": self.rd(output, x)["loss"]}


def recipe_step_fn(model, device, amp: bool, criterion=None) -> Callable[[torch.Tensor], None]:
    apply_local_fp32(model, "entropy")
    net, aux = split_aux_parameters(model)
    optimizer = torch.optim.Adam(net, lr=1e-4)
    args = argparse.Namespace(max_grad_norm=1.0, max_bad_steps=20, overflow_tol=1e8, save_dir=".", lambda_bpp=0.01)
    tr = Trainer(model=model, criterion=criterion or RecipeLoss(0.4, "rd", 0.01), optimizer=optimizer,
                 aux_optimizer=torch.optim.Adam(aux, lr=1e-3), scaler=make_grad_scaler(device.type, amp, "bf16"),
                 schedule=build_schedule(optimizer, "none", 1, 1, 1e-4), autocast=autocast_context(device.type, amp,
                                                                                                  "bf16"),
                 device=device, dist=DistInfo(), monitor=None, logger=RunLogger(False, {}, "."), stop=StopRequest())
    state = TrainState()
    sums = torch.zeros((), device=device)

    def step(x):
        nonlocal sums
        _, parts = train_step(tr, x, args, state)
        skip, _ = agree_to_skip_or_stop(tr, ~torch.isfinite(parts["total"]))
        if not skip:
            apply_update(tr, parts, args)
            sums = sums + parts["total"].detach()
        state.step += 1
    return step


def timed(step, batches, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x in batches:
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per loop per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    crop, batch = SCALES[args.scale]
    batches = photo_batches(crop, batch, args.steps, device)
    torch.manual_seed(0)
    base = build_model(make_arch(quality=3, replace="relu", replace_parts="encoder"))
    set_trainable_parts(base, "all", "encoder")
    print(f"{crop}px, batch {batch}, {args.rounds} rounds x {args.steps} steps per loop, {device}, "
          f"torch threads {torch.get_num_threads()}")
    print("img/s of: plain = CompressAI loop; loop = recipe loop with CompressAI's loss; "
          "recipe = recipe loop with its L1 + MS-SSIM loss")
    print(f"{'precision':<10}{'plain':>9}{'loop':>9}{'recipe':>9}{'loop/plain':>12}{'recipe/plain':>14}")
    for amp in (False, True):
        steps = {
            "plain": plain_step_fn(copy.deepcopy(base).to(device).train(), device, amp),
            "loop": recipe_step_fn(copy.deepcopy(base).to(device).train(), device, amp, CompressAILoss()),
            "recipe": recipe_step_fn(copy.deepcopy(base).to(device).train(), device, amp),
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


if __name__ == "__main__":
    main()
