"""The recovery study: how much of what GDN removal costs does fine-tuning win back?

    python -m bench.recovery --coco_dir ../shared/data/minicoco --work_dir bench_out/recovery
    python -m bench.recovery --coco_dir /data/coco --base_checkpoint bmshj2018-factorized-prior-3-5c6f152b.pth.tar --scale full

1. GDN base: --base_checkpoint (e.g. CompressAI's zoo weights) or, without it,
   a base trained here from scratch on the same photos (rate-distortion loss,
   --base_steps steps).
2. From that base, with the same data, steps and seed: GDN control fine-tuned
   (replace_parts none), ReLU encoder, ReLU all, NPU all (identity init) and
   NPU all with --init_from_gdn; each right after the swap and after fine-tuning.
3. Every model is evaluated with src.eval on a held-out folder of real photos
   (real bitstream bpp, PSNR, MS-SSIM); the table, a JSON and an RD plot are written.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from bench.common import GDN_SWAP_VARIANTS, VARIANTS
from src import eval as recipe_eval
from src.cli import run_cli
from src.commands import python, run
from src.data import PreparedCrops, epochs_for_steps, to_unit_float
from src.model_factory import quality_index, swapped_checkpoint

SCALES = {  # crop, crops per image, batch, base steps, fine-tune steps
    "small": (128, 8, 8, 1500, 300),
    "full": (224, 1, 16, 0, 5000),
}


def step(argv: List[str], log: Path) -> None:
    """Run a recipe command as a user would (from the current folder); its output goes to ``log``."""
    run(python(*argv), log, cwd=Path.cwd())


def common_flags(args, data: Path, batch: int, steps: int) -> List[str]:
    """Flags shared by every run: whole epochs adding up to about ``steps`` optimizer steps."""
    epochs = epochs_for_steps(steps, len(list((data / "train").glob("*.png"))), batch)
    return ["--coco_dir", str(data), "--quality", str(args.quality), "--pretrained", "false", "--epochs",
            str(epochs), "--batch_size", str(batch), "--num_workers", str(args.workers),
            "--loss_type", "rd", "--lambda_bpp", str(args.lambda_bpp), "--seed", str(args.seed),
            "--recon_count", "2", "--recon_every", str(epochs), "--log_every", "50", "--sched", "cosine"]


def fit_images(folder: Optional[Path]) -> Optional[torch.Tensor]:
    """The 16 crops --init_from_gdn fits on by default (None: no fit)."""
    if folder is None:
        return None
    crops = PreparedCrops(folder)
    torch.manual_seed(0)
    return to_unit_float(torch.stack([crops[i] for i in range(min(16, len(crops)))]), torch.device("cpu"))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco_dir", required=True, help="COCO root (train2017/, val2017/)")
    parser.add_argument("--eval_dir", default=None, help="held-out photos (default: COCO_DIR/val2017, full size)")
    parser.add_argument("--work_dir", default="bench_out/recovery")
    parser.add_argument("--base_checkpoint", default=None, help="GDN base weights (else trained here)")
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--quality", type=quality_index, default=3)
    parser.add_argument("--lambda_bpp", type=float, default=0.1)
    parser.add_argument("--train_scope", default="all")
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps (default: by --scale)")
    parser.add_argument("--base_steps", type=int, default=None, help="from-scratch base steps (default: by --scale)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    crop, per_image, batch, base_steps, steps = SCALES[args.scale]
    steps = args.steps or steps
    base_steps = args.base_steps or base_steps
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    data = work / f"crops{crop}"
    step(["scripts.coco_prepare", "--coco_dir", args.coco_dir, "--out_dir", str(data), "--crop_size", str(crop),
         "--crops_per_image", str(per_image)], work / "prepare.log")
    base = Path(args.base_checkpoint) if args.base_checkpoint else work / "base" / "last.pt"
    if not args.base_checkpoint and not base.exists():
        step(["src.train_finetune_relu", *common_flags(args, data, batch, base_steps), "--replace_parts", "none",
             "--train_scope", "all", "--lr", "1e-3", "--lr_warmup_steps", "100", "--save_dir", str(base.parent),
             "--recon_dir", str(work / "base" / "recon")], work / "base.log")

    checkpoints: Dict[str, Path] = {"gdn_base": base}
    for name in GDN_SWAP_VARIANTS:
        v = VARIANTS[name]
        if v.replace != "none":
            fit_on = data / "train" if "--init_from_gdn" in v.extra else None
            checkpoints[f"{name}@swap"] = swapped_checkpoint(base, v.replace, v.parts, work / f"{name}_swap.pt",
                                                             fit_images(fit_on))
        out = work / name
        if not (out / "last.pt").exists():
            flags = common_flags(args, data, batch, steps) + ["--replace_parts", v.parts]
            step([v.script, *flags, "--train_scope", args.train_scope, "--lr", "3e-4", "--lr_warmup_steps", "20",
                  "--base_checkpoint", str(base), "--save_dir", str(out), "--recon_dir", str(out / "recon"), *v.extra],
                 work / f"{name}.log")
        checkpoints[f"{name}@tuned"] = out / "last.pt"

    eval_dir = args.eval_dir or str(Path(args.coco_dir) / "val2017")
    results = recipe_eval.main(["--image_dir", eval_dir, "--checkpoint", *map(str, checkpoints.values()),
                                "--json", str(work / "recovery.json"), "--plot", str(work / "recovery.png")])["results"]
    print("\n| model | PSNR dB | MS-SSIM | bpp (real) | dPSNR vs GDN base |")
    print("| --- | --- | --- | --- | --- |")
    ref = results[0]["mean"]
    for name, result in zip(checkpoints, results):
        m = result["mean"]
        print(f"| {name} | {m['psnr']:.2f} | {m['ms_ssim']:.4f} | {m['bpp_real']:.3f} | {m['psnr'] - ref['psnr']:+.2f} |")
    (work / "recovery_names.json").write_text(json.dumps({k: str(v) for k, v in checkpoints.items()}, indent=1))
    print(f"\nrecovery study: {time.perf_counter() - start:.0f}s; eval on {eval_dir}; outputs in {work}")


if __name__ == "__main__":
    run_cli(main)
