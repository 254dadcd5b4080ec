"""The demo's models through every installed NPU target: ``./run.sh npu`` (after ``./run.sh demo``).

    python -m scripts.npu_demo [--demo_out demo_out] [--out npu_out] [--targets ...] [--precision ...]

Compiles the GDN control, the ReLU swap and the NPU blocks (ConvTranspose and sub-pixel decoders) that
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
from src.cli import run_cli
from src.quant.scheme import PROFILES

# (checkpoint under demo_out, decoder upsampling forms compiled, whether CPU fallbacks are a result): the GDN
# control is there to show what the compilers do with GDN (square roots, divisions), so its fallbacks and
# refusals are rows of the table; the ReLU swap and the NPU blocks must compile whole or stop the run.
DEMO_MODELS = (("gdn_base/best_loss.pt", ["convtranspose"], True),
               ("relu_all_finetuned/best_loss.pt", ["convtranspose"], False),
               ("npu_all_finetuned/best_loss.pt", ["convtranspose", "subpixel"], False))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="The demo's models through every installed NPU target.")
    p.add_argument("--demo_out", default="demo_out", help="the demo's output folder (./run.sh demo)")
    p.add_argument("--out", default="npu_out")
    p.add_argument("--targets", nargs="+", default=None, help="default: every target whose toolchain is installed")
    p.add_argument("--precision", nargs="+", default=sorted(PROFILES), choices=sorted(PROFILES))
    p.add_argument("--input_size", default="768x512", help="WIDTHxHEIGHT of the compilers' latency figures")
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
        npu_targets.main(["--ckpt", str(demo / ckpt), "--upsample", *upsample, *common,
                          "--allow_fallbacks", str(control).lower()])
    print(f"./run.sh npu: the demo's models through the targets in {time.perf_counter() - start:.0f}s; the table "
          f"over all of them: {args.out}/summary.md")


if __name__ == "__main__":
    run_cli(main)
