"""Reconstruction PNGs, ``recon/origin/NNNNN.png`` beside ``recon/<tag>/NNNNN.png``, and one sheet comparing them.

    python -m src.recon --recon_dir ./recon [--recon_dir ./recon_npu ...] [--out report.png] [--crop 128]

The originals are the first ``--recon_count`` val crops (sorted file order) and
are written once; each tag (``epoch_002``) holds the same indices decoded by
the model at that point, so a file viewer can flip between them.

The sheet: a row per image, the origin, then every tag of every run, each tile
captioned with its tag and its PSNR / MS-SSIM against the origin (8-bit, as
``src.eval`` measures). ``--crop N`` adds, under each row, the center N×N of
every tile enlarged (nearest neighbour) so that ringing and blur are visible.
Below the rows, a line chart of the mean PSNR per tag for each run. Drawn
with matplotlib; training writes ``<recon_dir>/report.png`` at the end of a run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torchvision.utils import make_grid, save_image

from src.checkpoint import write_atomic
from src.cli import UserError, run_cli
from src.images import DECODE_ERRORS, image_tensor, load_rgb
from src.losses import quantised_metrics


def write_pngs(images: torch.Tensor, folder: Path, overwrite: bool = True) -> List[Path]:
    """Write a batch in [0, 1] as ``folder/00000.png, 00001.png, ...``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:05d}.png"
        if overwrite or not path.exists():
            pixels = image.float().clamp(0, 1).cpu()
            write_atomic(path, lambda handle: save_image(pixels, handle, format="PNG"), durable=False)
        paths.append(path)
    return paths


def comparison_grid(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """Originals on the top row, reconstructions below (for W&B)."""
    both = torch.cat([originals.float().cpu(), recons.float().clamp(0, 1).cpu()])
    return make_grid(both, nrow=len(originals), padding=2)


# ---------------------------------------------------------------- the comparison sheet

TILE_INCHES = 2.2
DPI = 100


@dataclass
class Run:
    """One recon folder: its label, the origin files, and the tags that mirror them."""

    label: str
    folder: Path
    names: List[str]
    tags: List[str]


def read_png(path: Path) -> torch.Tensor:
    try:
        return image_tensor(load_rgb(path))[0]
    except DECODE_ERRORS as err:
        raise UserError(f"{path} cannot be read ({str(err).splitlines()[0][:100]})") from None


def find_run(folder: Path, label: str) -> Run:
    """The run in ``folder``; one-line errors for a missing origin/ or tags that do not mirror it."""
    origin = folder / "origin"
    if not origin.is_dir():
        raise UserError(f"{folder} has no origin/ folder: is it a --recon_dir of a training run?")
    names = sorted(p.name for p in origin.glob("*.png"))
    if not names:
        raise UserError(f"{origin} holds no PNG")
    tags = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "origin")
    if not tags:
        raise UserError(f"{folder} holds origin/ but no reconstruction folder beside it")
    for tag in tags:
        have = sorted(p.name for p in (folder / tag).glob("*.png"))
        if have != names:
            missing, extra = sorted(set(names) - set(have)), sorted(set(have) - set(names))
            raise UserError(f"{folder / tag} does not match origin/ one to one (missing: {missing[:4] or 'none'}, "
                            f"extra: {extra[:4] or 'none'})")
    return Run(label, folder, names, tags)


def read_run(run: Run) -> Dict[str, List[torch.Tensor]]:
    """Every PNG of a run, read once: ``{"origin" or tag: [image per name]}``; a tag must match origin's sizes."""
    images = {tag: [read_png(run.folder / tag / n) for n in run.names] for tag in ["origin", *run.tags]}
    for tag in run.tags:
        for name, origin, image in zip(run.names, images["origin"], images[tag]):
            if image.shape != origin.shape:
                raise UserError(f"{run.folder / tag / name} is {image.shape[2]}x{image.shape[1]} but origin/{name} is "
                                f"{origin.shape[2]}x{origin.shape[1]}: a tag must mirror origin/ (was the folder "
                                "reused by a run with another crop size?)")
    return images


def check_out(out: Path) -> None:
    """One line for a sheet path that cannot be written, before any image is read."""
    from matplotlib.backend_bases import FigureCanvasBase

    if out.is_dir():
        raise UserError(f"sheet path {out} is a folder; name the sheet file, e.g. {out / 'report.png'}")
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in formats:
        raise UserError(f"sheet path {out}: matplotlib cannot write '{out.suffix}' "
                        f"(use one of {', '.join(sorted(formats))})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")
    except OSError as err:
        raise UserError(f"sheet path {out} cannot be created ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def measure(runs: Sequence[Run], images: Dict[str, Dict[str, List[torch.Tensor]]]):
    """``{run label: {tag: [metrics per image]}}``, measured as ``src.eval`` measures."""
    table = {}
    for run in runs:
        origins = images[run.label]["origin"]
        table[run.label] = {tag: [quantised_metrics(o.unsqueeze(0), x.unsqueeze(0))
                                  for o, x in zip(origins, images[run.label][tag])] for tag in run.tags}
    return table


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    size = min(size, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top:top + size, left:left + size]


def draw_sheet(runs: Sequence[Run], images, table, out: Path, crop: int = 0) -> Path:
    """The sheet: image rows (and zoom rows), then the mean-PSNR chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("origin", None, None)] + [(f"{r.label}:{t}" if len(runs) > 1 else t, r, t)
                                          for r in runs for t in r.tags]
    image_rows = max(len(r.names) for r in runs)
    per_image = 2 if crop else 1
    rows = image_rows * per_image
    fig = plt.figure(figsize=(TILE_INCHES * len(columns), TILE_INCHES * (rows + 1.3)), dpi=DPI)
    grid = fig.add_gridspec(rows + 1, len(columns), height_ratios=[1] * rows + [1.3])
    first = runs[0]
    for index in range(image_rows):
        name = first.names[index] if index < len(first.names) else None
        origin = images[first.label]["origin"][index] if name else None
        for col, (title, run, tag) in enumerate(columns):
            if run is None:
                image, caption = origin, f"origin {name}"
            elif index < len(run.names):
                image = images[run.label][tag][index]
                m = table[run.label][tag][index]
                caption = f"{title}\n{m['psnr']:.2f} dB / {m['ms_ssim']:.4f}"
            else:
                continue
            for sub in range(per_image):
                ax = fig.add_subplot(grid[index * per_image + sub, col])
                shown = image if sub == 0 else center_crop(image, crop)
                ax.imshow(shown.permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(caption if sub == 0 else f"center {min(crop, *image.shape[-2:])} px", fontsize=9)
    chart = fig.add_subplot(grid[rows, :])
    for run in runs:
        means = [sum(m["psnr"] for m in table[run.label][t]) / len(table[run.label][t]) for t in run.tags]
        chart.plot(run.tags, means, "o-", label=run.label)
    chart.set_ylabel("mean PSNR [dB]", fontsize=9)
    chart.set_title("mean PSNR against origin, per tag", fontsize=9)
    chart.tick_params(labelsize=8)
    chart.grid(True, alpha=0.3)
    chart.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def unique_labels(folders: Sequence[Path]) -> List[str]:
    """The shortest path tails that tell the folders apart (``npu/q3/recon`` vs ``gdn/q3/recon``)."""
    parts = [f.resolve().parts for f in folders]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(f) for f in folders]


def write_report(recon_dirs: Sequence[Path], out: Path, crop: int = 0) -> Dict:
    """Check the folders, measure every tile and draw the sheet; returns the metrics table."""
    labels = unique_labels([Path(d) for d in recon_dirs])
    runs = [find_run(Path(d), label) for d, label in zip(recon_dirs, labels)]
    check_out(Path(out))
    images = {run.label: read_run(run) for run in runs}
    table = measure(runs, images)
    draw_sheet(runs, images, table, out, crop)
    return table


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One sheet comparing recon/<tag>/ PNGs with recon/origin/.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recon_dir", action="append", required=True, help="a run's --recon_dir (repeatable)")
    p.add_argument("--out", default=None, help="the sheet (default: <first recon_dir>/report.png)")
    p.add_argument("--crop", type=int, default=0, help="also show the center N x N of every tile enlarged (0 = off)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    if args.crop < 0:
        raise UserError("--crop must be >= 0")
    out = Path(args.out) if args.out else Path(args.recon_dir[0]) / "report.png"
    table = write_report([Path(d) for d in args.recon_dir], out, args.crop)
    for label, tags in table.items():
        for tag, metrics in tags.items():
            psnr = sum(m["psnr"] for m in metrics) / len(metrics)
            print(f"{label} {tag}: mean PSNR {psnr:.2f} dB over {len(metrics)} images")
    print(f"sheet -> {out}")
    return table


if __name__ == "__main__":
    run_cli(main)
