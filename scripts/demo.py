"""The whole recipe end to end on real photographs, small enough for a 2-core CPU.

    ./run.sh demo        (or: python -m scripts.demo)

1. lays out photos shipped with scikit-image (astronaut, coffee, chelsea, ...)
   like COCO (train2017/ and val2017/, as JPEG) in demo_out/coco;
2. prepares 224x224 crops with scripts.coco_prepare;
3. fine-tunes bmshj2018_factorized q=1 with GDN->ReLU in the encoder
   (CompressAI's pretrained weights when they can be downloaded, otherwise
   random initialisation, said plainly);
4. evaluates best_loss.pt, the epoch with the best val loss (PSNR, MS-SSIM, real bitstream bpp);
5. exports encoder and decoder to ONNX, verified with onnxruntime.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from src.cli import UserError, run_cli
from src.images import load_rgb
from src.model_factory import download_pretrained_state, make_arch
from src.sample_photos import skimage_photos

VAL_PHOTOS = ("astronaut", "coffee")
TRAIN_PHOTOS = ("chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "ihc", "retina", "camera",
                "moon", "brick", "grass", "gravel", "coins", "page", "immunohistochemistry")


def lay_out_coco(root: Path) -> Path:
    """Write the photos as COCO-style JPEGs (train2017/, val2017/)."""
    for split, names in (("train2017", TRAIN_PHOTOS), ("val2017", VAL_PHOTOS)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for index, src in enumerate(skimage_photos(names)):
            out = root / split / f"{index + 1:012d}.jpg"
            if not out.exists():
                load_rgb(src).save(out, quality=95)
    return root


def run_step(title: str, args: List[str]) -> None:
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], check=True)


def pretrained_available(quality: int) -> bool:
    try:
        download_pretrained_state(make_arch(quality=quality, replace="none"))
        return True
    except UserError as err:
        print(f"note: {err}\nnote: the demo continues from random initialisation (--pretrained false)")
        return False


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Run the recipe end to end on scikit-image photos.")
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="steps per epoch")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    coco = lay_out_coco(out / "coco")
    crops = out / "coco224"
    run_step("1/4 prepare 224x224 crops", ["-m", "scripts.coco_prepare", "--coco_dir", str(coco),
                                           "--out_dir", str(crops), "--crops_per_image", "4", "--workers", "2"])
    pretrained = pretrained_available(quality=1)
    ckpts = out / "checkpoints"
    run_step("2/4 fine-tune with GDN->ReLU (encoder)", [
        "-m", "src.train_finetune_relu", "--coco_dir", str(crops), "--quality", "1",
        "--pretrained", str(pretrained).lower(), "--epochs", str(args.epochs),
        "--max_steps_per_epoch", str(args.steps), "--batch_size", "4", "--num_workers", "1",
        "--lr", "1e-4" if pretrained else "1e-3", "--train_scope", "all" if not pretrained else "replaced",
        "--save_dir", str(ckpts), "--recon_dir", str(out / "recon"), "--recon_count", "2", "--log_every", "4"])
    run_step("3/4 evaluate", ["-m", "src.eval", "--coco_dir", str(crops), "--use_prepared", "true",
                              "--checkpoint", str(ckpts / "best_loss.pt"), "--json", str(out / "eval.json")])
    for part in ("encoder", "decoder"):
        run_step(f"4/4 export {part} to ONNX", ["-m", "scripts.export_onnx", "--ckpt", str(ckpts / "best_loss.pt"),
                                                "--part", part, "--out", str(out / "onnx" / f"{part}.onnx"),
                                                "--input_size", "224"])
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; outputs in {out}/ "
          f"(checkpoints/, recon/origin vs recon/epoch_*, eval.json, onnx/)")


if __name__ == "__main__":
    run_cli(main)
