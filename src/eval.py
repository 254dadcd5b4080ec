"""Evaluate checkpoints: PSNR / MS-SSIM, estimated and real bitstream bpp, coding time.

    python -m src.eval --coco_dir /data/coco224 --use_prepared true --checkpoint ./checkpoints/best_loss.pt
    python -m src.eval --image_dir kodak/ --checkpoint gdn.pt relu.pt npu.pt --json rd.json --plot rd.png
    python -m src.eval --image_dir kodak/ --curve gdn=q1/,q2/,q3/,q4/ --curve npu=n1/,n2/,n3/,n4/ --plot rd.png

The architecture is rebuilt from each checkpoint. Images of any size are
padded to a multiple of 64 (CompressAI's own eval does the same), coded with
the real entropy coder (``compress``/``decompress``), cropped back, and
measured on the original area. Metrics follow CompressAI 1.2.8's
``eval_model``: the reconstruction is clamped to [0, 1] and quantised to 8 bits
(as a saved PNG would be), PSNR and MS-SSIM are computed per image, then averaged.

A checkpoint may be given as a run folder: it stands for that run's
``best_loss.pt``, the epoch with the best val value of the trained loss (rate
included under ``--loss_type rd``), which is the one to put on an RD curve.
``--curve NAME=CKPT,...`` groups checkpoints into a codec's RD curve and
reports Bjøntegaard deltas of every curve against the first (``src.rd_curves``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from src.cli import UserError, run_cli, str2bool
from src.codec.roundtrip import bitstream_roundtrip
from src.data import image_files
from src.images import DECODE_ERRORS, decode_reason, image_tensor, load_rgb
from src.codec.limits import MAX_PIXELS, padded_pixels
from src.losses import bpp_from_likelihoods, quantised_metrics
from src.model_factory import load_checkpoint_model
from src.outputs import check_output_file, write_output
from src.rd_curves import MIN_POINTS, compare_curves, curve_point, curves_table, parse_curve, plot_curves

METRIC_KEYS = ("psnr", "ms_ssim", "bpp_est", "bpp_real", "enc_s", "dec_s")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PSNR / MS-SSIM / bpp (estimated and real) of checkpoints.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=[],
                   help="one or more checkpoints or run folders (a folder means its best_loss.pt); first = reference")
    p.add_argument("--curve", action="append", default=[], metavar="NAME=CKPT[,CKPT...]",
                   help="an RD curve: one checkpoint (or run folder) per rate point; repeat for each codec. "
                        "BD-rate / BD-PSNR of every curve against the first (needs >= 4 points per curve)")
    p.add_argument("--coco_dir", default=None, help="prepared crops root (val/) or COCO root (val2017/)")
    p.add_argument("--use_prepared", type=str2bool, default=True)
    p.add_argument("--image_dir", default=None, help="any folder of images of any size (e.g. Kodak)")
    p.add_argument("--max_images", type=int, default=0, help="first N images (0 = all)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", default=None, help="write per-image and mean results (and the curves) here")
    p.add_argument("--plot", default=None, help="write an RD plot (bpp vs PSNR and MS-SSIM) here")
    return p


def eval_folder(args: argparse.Namespace) -> Path:
    if args.image_dir:
        return Path(args.image_dir)
    if not args.coco_dir:
        raise UserError("give --image_dir DIR or --coco_dir DIR")
    return Path(args.coco_dir) / ("val" if args.use_prepared else "val2017")


def resolve_checkpoint(text: str) -> Path:
    """A checkpoint file, or a run folder standing for its ``best_loss.pt``."""
    path = Path(text)
    if not path.is_dir():
        return path
    if not (path / "best_loss.pt").is_file():
        raise UserError(f"{path} is a folder without best_loss.pt; name the checkpoint file "
                        "(runs from before best_loss.pt existed have last.pt)")
    return path / "best_loss.pt"


def load_model(path: Path, device: torch.device):
    """(model, arch, entropy_tables_present) rebuilt from the checkpoint alone."""
    model, arch, _ = load_checkpoint_model(path)
    tables = [v for k, v in model.state_dict().items() if k.endswith("_quantized_cdf")]
    updated = bool(tables) and all(t.numel() > 0 for t in tables)
    if not updated:
        print(f"warning: {path} was saved without model.update(): its entropy coder tables are empty; "
              "they are rebuilt here, so real bpp reflects the current quantiles")
    model.update(force=not updated)
    return model.to(device).eval(), arch, updated


@torch.no_grad()
def code_image(model, x: torch.Tensor, source: str = "the model") -> Dict[str, float]:
    """Real bitstream round trip and the likelihood estimate, for one image (1, 3, H, W)."""
    h, w = x.shape[-2:]
    coded = bitstream_roundtrip(model, x, source=source)
    bpp_est = bpp_from_likelihoods(model(coded["x_padded"])["likelihoods"], h * w).item()
    return {**quantised_metrics(x, coded["x_hat"]), "bpp_est": bpp_est, "bpp_real": coded["bits"] / (h * w),
            "enc_s": coded["enc_s"], "dec_s": coded["dec_s"]}


def check_size(width: int, height: int) -> None:
    """``ValueError`` (a skip, in a folder) for an image over ``MAX_PIXELS`` once padded; runs before decoding."""
    if padded_pixels(height, width) > MAX_PIXELS:
        raise ValueError(f"{width}x{height} is more than the {MAX_PIXELS} pixels (padded to 64) "
                         "this evaluation codes")


def readable_images(files: List[Path]) -> List[Path]:
    """The files that decode; each other one is named with its reason, and a summary line counts them."""
    good = []
    for file in files:
        try:
            load_rgb(file, check_size)
            good.append(file)
        except DECODE_ERRORS as err:
            print(f"warning: skipping {file}: cannot be decoded ({decode_reason(err)})")
    if len(good) < len(files):
        print(f"{len(files) - len(good)} of {len(files)} images skipped (unreadable)")
    if not good:
        raise UserError(f"none of the {len(files)} image files in {files[0].parent} could be decoded")
    return good


def plot_formats() -> Sequence[str]:
    """The file suffixes matplotlib can save a figure as (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(f".{ext}" for ext in FigureCanvasBase.get_supported_filetypes())


def check_outputs(args: argparse.Namespace, checkpoints: Sequence[Path]) -> None:
    """--json and --plot, before anything is evaluated: an unwritable one would lose the whole evaluation."""
    if args.json:
        check_output_file(Path(args.json), "--json", inputs=checkpoints)
    if args.plot:
        check_output_file(Path(args.plot), "--plot", inputs=checkpoints, suffixes=plot_formats(),
                          what="a figure (a format matplotlib writes)")
    if args.json and args.plot and Path(args.json).resolve() == Path(args.plot).resolve():
        raise UserError(f"--json and --plot are the same file {args.json}")


def evaluate_checkpoint(path: Path, files: List[Path], device: torch.device) -> Dict[str, Any]:
    model, arch, updated = load_model(path, device)
    images = []
    for file in tqdm(files, desc=path.name, leave=False):
        x = image_tensor(load_rgb(file)).to(device)
        images.append({"name": file.name, **code_image(model, x, source=f"{path} on {file.name}")})
    mean = {k: sum(img[k] for img in images) / len(images) for k in METRIC_KEYS}
    return {"checkpoint": str(path), "arch": arch, "entropy_updated_in_checkpoint": updated,
            "mean": mean, "images": images}


def checkpoint_label(path: str) -> str:
    """Short name of a checkpoint: ``run/last.pt`` for the generic file names, else the file name."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.stem in ("last", "best_msssim", "best_loss") else path.name


def results_table(results: List[Dict[str, Any]]) -> str:
    """One row per checkpoint; deltas against the first."""
    head = f"{'checkpoint':<34}{'PSNR':>8}{'MS-SSIM':>9}{'bpp est':>9}{'bpp real':>9}{'real/est':>9}" \
           f"{'enc ms':>8}{'dec ms':>8}{'dPSNR':>8}{'dMS-SSIM':>10}{'dbpp':>8}"
    ref = results[0]["mean"]
    lines = [head]
    for r in results:
        m = r["mean"]
        gap = 100 * (m["bpp_real"] / m["bpp_est"] - 1) if m["bpp_est"] > 0 else float("nan")
        name = checkpoint_label(r["checkpoint"])
        lines.append(f"{name[:33]:<34}{m['psnr']:>8.3f}{m['ms_ssim']:>9.4f}{m['bpp_est']:>9.4f}"
                     f"{m['bpp_real']:>9.4f}{gap:>+8.2f}%{1000 * m['enc_s']:>8.1f}{1000 * m['dec_s']:>8.1f}"
                     f"{m['psnr'] - ref['psnr']:>+8.3f}{m['ms_ssim'] - ref['ms_ssim']:>+10.4f}"
                     f"{m['bpp_real'] - ref['bpp_real']:>+8.4f}")
    return "\n".join(lines)


def plot_rd(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        m, label = r["mean"], checkpoint_label(r["checkpoint"])
        axes[0].plot(m["bpp_real"], m["psnr"], "o", label=label)
        axes[1].plot(m["bpp_real"], m["ms_ssim"], "o", label=label)
    for ax, ylabel in zip(axes, ("PSNR [dB]", "MS-SSIM")):
        ax.set_xlabel("bpp (real bitstream)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_curves(texts: Sequence[str]) -> Dict[str, List[Path]]:
    curves: Dict[str, List[Path]] = {}
    for text in texts:
        try:
            name, checkpoints = parse_curve(text)
        except ValueError as err:
            raise UserError(str(err)) from None
        if name in curves:
            raise UserError(f"--curve {name} is given twice")
        curves[name] = [resolve_checkpoint(c) for c in checkpoints]
    for name, checkpoints in curves.items():
        if len(checkpoints) < 2:
            raise UserError(f"--curve {name} has one point: a curve needs at least 2 (BD-rate needs {MIN_POINTS}); "
                            "evaluate a single checkpoint with --checkpoint")
    return curves


def report_curves(curves: Dict[str, List[Path]], by_path: Dict[Path, Dict[str, Any]]) -> Dict[str, Any]:
    """Print the curves' points and BD figures; the JSON section that holds them."""
    points = {name: [curve_point(by_path[c]["mean"], str(c)) for c in ckpts] for name, ckpts in curves.items()}
    deltas = compare_curves(points)
    print(curves_table(points, deltas))
    return {"anchor": next(iter(curves)), "points": points, "bd": deltas}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Evaluate; returns ``{"results": [...], "curves": {...} or None}`` as written to ``--json``."""
    args = get_args_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    if not args.checkpoint and not args.curve:
        raise UserError("give --checkpoint CKPT [CKPT ...] or --curve NAME=CKPT,CKPT,... (or both)")
    checkpoints = [resolve_checkpoint(c) for c in args.checkpoint]
    curves = parse_curves(args.curve)
    check_outputs(args, checkpoints + [c for ckpts in curves.values() for c in ckpts])
    files = image_files(eval_folder(args), "eval image")
    files = readable_images(files[: args.max_images] if args.max_images > 0 else files)
    device = torch.device(args.device)
    unique = list(dict.fromkeys(checkpoints + [c for ckpts in curves.values() for c in ckpts]))
    by_path = {c: evaluate_checkpoint(c, files, device) for c in unique}
    print(f"{len(files)} images from {eval_folder(args)}")
    report: Dict[str, Any] = {"results": [by_path[c] for c in unique], "curves": None}
    if checkpoints:
        print(results_table([by_path[c] for c in checkpoints]))
    if curves:
        report["curves"] = report_curves(curves, by_path)
    if args.json:
        text = json.dumps(report, indent=1).encode()
        write_output(Path(args.json), lambda handle: handle.write(text), "--json")
    if args.plot:
        write_plot(args, report, curves, by_path, checkpoints, len(files))
    return report


def write_plot(args: argparse.Namespace, report: Dict[str, Any], curves: Dict[str, List[Path]],
               by_path: Dict[Path, Dict[str, Any]], checkpoints: List[Path], count: int) -> None:
    try:
        if curves:
            plot_curves(report["curves"]["points"], Path(args.plot), title=f"{count} images from "
                        f"{eval_folder(args)}")
        else:
            plot_rd([by_path[c] for c in checkpoints], Path(args.plot))
    except OSError as err:
        raise UserError(f"--plot {args.plot} could not be written ({err.strerror or err})") from None


if __name__ == "__main__":
    run_cli(main)
