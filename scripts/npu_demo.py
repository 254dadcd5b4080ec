"""The demo's models through every installed NPU target: ``./run.sh npu`` (after ``./run.sh demo``).

    python -m scripts.npu_demo [--demo_out demo_out] [--out npu_out] [--targets ...] [--precision ...] \
        [--input_size 512x512] [--subpixel false]

Compiles the GDN control, the ReLU swap and the NPU blocks (SAME-padded ConvTranspose decoder; ``--subpixel true``
adds the sub-pixel decoder) that
``scripts.demo`` fine-tuned, calibrated on the demo's training photos and measured on its held-out photos, with
``scripts.npu_targets``; prints the table. Runs the demo first when its models are missing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from scripts import npu_targets
from src.cli import run_cli, str2bool
from src.quant.scheme import PROFILES

# (checkpoint under demo_out, decoder upsampling forms compiled, whether CPU fallbacks are a result): the GDN
# control is there to show what the compilers do with GDN (square roots, divisions), so its fallbacks and
# refusals are rows of the table; the ReLU swap and the NPU blocks must compile whole or stop the run.
DEMO_MODELS = (("gdn_base/best_loss.pt", ["convtranspose"], True),
               ("relu_all_finetuned/best_loss.pt", ["convtranspose"], False),
               ("npu_all_finetuned/best_loss.pt", ["convtranspose"], False))
# The compile size: the demo's held-out astronaut is 512x512, so one static model per part serves it and only the
# other held-out photo (600x400, padded to 640x448) needs a second one; each static shape is a full conversion,
# calibration and compile per target (minutes on 2 cores). The 768x512 (Kodak) figures of docs/npu_targets.md come
# from the RD study's models through scripts.npu_targets.
DEMO_INPUT_SIZE = "512x512"


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="The demo's models through every installed NPU target.")
    p.add_argument("--demo_out", default="demo_out", help="the demo's output folder (./run.sh demo)")
    p.add_argument("--out", default="npu_out")
    p.add_argument("--targets", nargs="+", default=None, help="default: every target whose toolchain is installed")
    p.add_argument("--precision", nargs="+", default=sorted(PROFILES), choices=sorted(PROFILES))
    p.add_argument("--input_size", default=DEMO_INPUT_SIZE, help="WIDTHxHEIGHT the artefacts are compiled at and "
                   "the compilers' latency figures are for (default: the held-out astronaut's size)")
    p.add_argument("--subpixel", type=str2bool, default=False,
                   help="also compile the NPU blocks with the sub-pixel decoder (--upsample subpixel)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    demo = Path(args.demo_out)
    if not all((demo / ckpt).is_file() for ckpt, _, _ in DEMO_MODELS):
        print(f"the demo's models are not in {demo}/: running the demo first (./run.sh demo)", flush=True)
        subprocess.run([sys.executable, "-m", "scripts.demo", "--out", str(demo)], check=True)
    common = ["--calib_dir", str(demo / "coco" / "train2017"), "--eval_dir", str(demo / "coco" / "val2017"),
              "--precision", *args.precision, "--input_size", args.input_size, "--out", args.out]
    if args.targets:
        common += ["--targets", *args.targets]
    for ckpt, upsample, control in DEMO_MODELS:
        if args.subpixel and not control and ckpt.startswith("npu"):
            upsample = [*upsample, "subpixel"]
        npu_targets.main(["--ckpt", str(demo / ckpt), "--upsample", *upsample, *common,
                          "--allow_fallbacks", str(control).lower()])
    print(f"./run.sh npu: the demo's models through the targets in {time.perf_counter() - start:.0f}s; the table "
          f"over all of them: {args.out}/summary.md")


if __name__ == "__main__":
    run_cli(main)
