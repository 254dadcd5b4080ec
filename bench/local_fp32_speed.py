"""Training-step speed of the local-FP32 modes under bf16 autocast, and of the whole decoder in FP32.

    python -m bench.local_fp32_speed [--steps 8] [--repeats 2]

"whole g_s" is what ``--local_fp32 entropy+decoder`` ran before it was narrowed
to the decoder's risky layers (IGDN, norm and exp/log-type modules): kept here
as the reference the change is measured against.
"""

from __future__ import annotations

import argparse
import time

import torch

from src.losses import RecipeLoss
from src.model_factory import build_model, make_arch
from src.precision import apply_local_fp32, autocast_context, run_in_fp32

MODES = ("entropy", "entropy+decoder", "whole g_s", "all_normexp")


def images_per_second(mode: str, steps: int, batch: int = 8, side: int = 128) -> float:
    torch.manual_seed(0)
    model = build_model(make_arch(quality=3, replace="none")).train()
    if mode == "whole g_s":
        apply_local_fp32(model, "entropy")
        run_in_fp32(model.g_s)
    else:
        apply_local_fp32(model, mode)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    criterion, autocast = RecipeLoss(0.4, "rd", 0.01), autocast_context("cpu", True, "bf16")
    x = torch.rand(batch, 3, side, side)

    def step():
        with autocast():
            output = model(x)
        loss = criterion(output, x)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print("GDN bmshj2018-factorized q=3, 128 px, batch 8, bf16 autocast, recipe loss, CPU")
    for mode in MODES:
        rates = [images_per_second(mode, args.steps) for _ in range(args.repeats)]
        print(f"{mode:<16}" + "".join(f"{r:>9.2f}" for r in rates) + " img/s")


if __name__ == "__main__":
    main()
