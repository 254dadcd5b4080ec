"""The recipe's story on real photographs, small enough for a 2-core CPU and for a machine with no network.

    ./run.sh demo        (or: python -m scripts.demo)

1. lays out photos shipped with scikit-image like COCO (train2017/, val2017/ as
   JPEG) in demo_out/coco and prepares 64x64 training crops with scripts.coco_prepare;
2. a GDN base: CompressAI's pretrained bmshj2018-factorized q=1 when it can be
   downloaded; otherwise one trained here with the recipe's own script
   (``--replace_parts none``, CompressAI's objective at q=1's lambda), cached
   in demo_out/gdn_base so that a second run skips it;
3. the same weights right after GDN is swapped for ReLU and for the NPU blocks
   (no training), then both fine-tuned from the base with the same budget;
4. every stage evaluated by src.eval on the held-out photos at full size (real
   bitstream), a table of PSNR / MS-SSIM / bpp per stage, and one sheet
   (src.recon) with a held-out photo decoded by every stage, each column
   captioned with src.eval's PSNR / MS-SSIM / real bpp on that photo, and an
   RD plot of the stages;
5. the fine-tuned NPU encoder and decoder exported to ONNX and checked in onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from src.checkpoint import save_checkpoint
from src.checkpoint_format import weights_payload
from src.cli import UserError, run_cli
from src.codec.roundtrip import bitstream_roundtrip
from src.commands import run
from src.data import epochs_for_steps
from src.eval import load_model
from src.images import image_tensor, load_rgb
from src.model_factory import download_pretrained_state, make_arch, swapped_checkpoint
from src.recon import write_pngs, write_rate, write_report
from src.sample_photos import skimage_photos
from src.train_args import zoo_objective

VAL_PHOTOS = ("astronaut", "coffee")
TRAIN_PHOTOS = ("chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "ihc", "retina", "camera",
                "moon", "brick", "grass", "gravel", "coins", "page", "immunohistochemistry")
QUALITY = 1


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
    print(f"\n=== {title}", flush=True)
    run([sys.executable, *args])


def zoo_base(out: Path) -> Optional[Path]:
    """CompressAI's q=1 weights as a local file, or None (said in one line) when they cannot be downloaded."""
    try:
        state = download_pretrained_state(make_arch(quality=QUALITY, replace="none"))
    except UserError as err:
        print(f"note: {err}")
        return None
    path = out / "zoo_q1.pt"
    save_checkpoint(weights_payload(state, make_arch(quality=QUALITY, replace="none")), path)
    return path


BATCH = 8


def training_flags(crops: Path, steps: int, lr: str, save: Path) -> List[str]:
    """Whole epochs adding up to about ``steps``; CompressAI's objective at q=1's trade-off, in fp32
    (the faster precision on CPUs without AMX)."""
    epochs = epochs_for_steps(steps, len(list((crops / "train").glob("*.png"))), BATCH)
    return ["--coco_dir", str(crops), "--quality", str(QUALITY), "--pretrained", "false",
            "--epochs", str(epochs), "--recon_every", str(epochs), "--batch_size", str(BATCH),
            "--num_workers", "0", *zoo_objective(QUALITY), "--amp", "false", "--train_scope", "all", "--lr", lr,
            "--save_dir", str(save), "--recon_dir", str(save / "recon"), "--recon_count", "2", "--log_every", "20",
            "--overwrite", "true"]  # a second demo run trains its stages again in the same folders


def trained_base(out: Path, crops: Path, steps: int) -> Path:
    """A GDN base trained here (cached: a second demo run reuses it)."""
    base = out / "gdn_base"
    if (base / "done").exists():
        print(f"\n=== GDN base: reusing {base / 'best_loss.pt'} (delete {base} to train it again)")
        return base / "best_loss.pt"
    run_step(f"GDN base: no pretrained weights, so a small one is trained here (about {steps} steps, 2-3 minutes)",
             ["-m", "src.train_finetune_relu", *training_flags(crops, steps, "1e-3", base),
              "--replace_parts", "none", "--lr_warmup_steps", "50"])
    (base / "done").write_text("ok\n")
    return base / "best_loss.pt"


@torch.no_grad()
def decode_stages(stages: Dict[str, Path], photo: Path, folder: Path, bpp: Mapping[str, float]) -> Path:
    """A held-out photo coded and decoded (real bitstream) by every stage, as a recon folder + sheet.

    The photo is coded whole, as ``src.eval`` codes it, so each column's PSNR
    and MS-SSIM are src.eval's on that photo; ``bpp[stage]`` is the real
    bitstream bpp src.eval measured for it (``photo_bpp``), recorded beside
    the column for its caption and its point on the sheet's RD plot.
    """
    x = image_tensor(load_rgb(photo))
    write_pngs(x, folder / "origin")
    for index, (name, checkpoint) in enumerate(stages.items(), start=1):
        model = load_model(checkpoint, torch.device("cpu"))[0]
        tag = f"{index}_{name}"
        write_pngs(bitstream_roundtrip(model, x, source=f"{checkpoint} on {photo.name}")["x_hat"], folder / tag)
        write_rate(folder, tag, bpp[name], "real", f"{photo.name}, measured by src.eval",
                   per_image={"00000.png": bpp[name]})
    write_report([folder], folder / "report.png", crop=96)
    return folder / "report.png"


def photo_bpp(report: Dict[str, Any], stages: Mapping[str, Path], photo: Path) -> Dict[str, float]:
    """``{stage: real bpp}`` that src.eval measured on ``photo``, read from its ``--json`` report."""
    by_checkpoint = {result["checkpoint"]: result for result in report["results"]}
    return {name: next(img["bpp_real"] for img in by_checkpoint[str(path)]["images"] if img["name"] == photo.name)
            for name, path in stages.items()}


def stage_table(report: Dict, names: Sequence[str]) -> str:
    lines = [f"{'stage':<26}{'PSNR dB':>9}{'MS-SSIM':>9}{'bpp (real)':>12}"]
    for name, result in zip(names, report["results"]):
        m = result["mean"]
        lines.append(f"{name:<26}{m['psnr']:>9.2f}{m['ms_ssim']:>9.4f}{m['bpp_real']:>12.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="The recipe's story on scikit-image photos, offline if need be.")
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--base_steps", type=int, default=1000, help="steps of the GDN base trained when offline")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per swapped model")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    coco = lay_out_coco(out / "coco")
    crops = out / "coco64"
    run_step("prepare 64x64 training crops", ["-m", "scripts.coco_prepare", "--coco_dir", str(coco), "--out_dir",
                                              str(crops), "--crop_size", "64", "--crops_per_image", "32",
                                              "--workers", "2"])
    zoo = zoo_base(out)
    base = zoo if zoo is not None else trained_base(out, crops, args.base_steps)
    stages = {"gdn_base": base}
    for kind in ("relu", "npu"):
        stages[f"{kind}_all_after_swap"] = swapped_checkpoint(base, kind, "all", out / f"{kind}_all_after_swap.pt")
    for kind, script in (("relu", ["-m", "src.train_finetune_relu"]), ("npu", ["train_finetune_npu.py"])):
        run_dir = out / f"{kind}_all_finetuned"
        run_step(f"fine-tune {kind.upper()} everywhere from the GDN base ({args.steps} steps)",
                 [*script, *training_flags(crops, args.steps, "3e-4", run_dir),
                  "--replace_parts", "all", "--lr_warmup_steps", "20", "--base_checkpoint", str(base)])
        stages[f"{kind}_all_finetuned"] = run_dir / "best_loss.pt"
    held_out = coco / "val2017"
    run_step("evaluate every stage on the held-out photos (full size, real bitstream)",
             ["-m", "src.eval", "--image_dir", str(held_out), "--checkpoint", *map(str, stages.values()),
              "--json", str(out / "eval.json")])
    for part in ("encoder", "decoder"):
        run_step(f"export the fine-tuned NPU {part} to ONNX",
                 ["-m", "scripts.export_onnx", "--ckpt", str(stages["npu_all_finetuned"]), "--part", part,
                  "--out", str(out / "onnx" / f"npu_{part}.onnx"), "--input_size", "256",
                  "--image", str(sorted(held_out.glob("*.jpg"))[0])])
    report = json.loads((out / "eval.json").read_text())
    photo = sorted(held_out.glob("*.jpg"))[0]
    sheet = decode_stages(stages, photo, out / "stages", photo_bpp(report, stages, photo))
    print(f"\n=== the story on {len(list(held_out.glob('*.jpg')))} held-out photos "
          f"({'CompressAI pretrained' if zoo else 'GDN base trained here'} q={QUALITY})")
    print(stage_table(report, list(stages)))
    print(f"\nside by side (held-out {photo.name} decoded by every stage, PSNR / MS-SSIM / real bpp, RD plot): "
          f"{sheet}")
    print(f"demo finished in {time.perf_counter() - start:.0f}s; outputs in {out}/")


if __name__ == "__main__":
    run_cli(main)
