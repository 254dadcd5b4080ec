"""Reconstruction PNGs, ``recon/origin/NNNNN.png`` beside ``recon/<tag>/NNNNN.png``, and one sheet comparing them.

    python -m src.recon --recon_dir ./recon [--recon_dir ./recon_npu ...] [--out report.png] [--crop 128]

The originals are the first ``--recon_count`` val crops (sorted file order) and
are written once; each tag (``epoch_002``) holds the same indices decoded by
the model at that point, so a file viewer can flip between them.

The rate of a tag is recorded beside its folder, in ``<recon_dir>/<tag>.json``
(``write_rate``): training writes the epoch's val bpp there (the likelihood
estimate over the val set, with that set's PSNR / MS-SSIM), the demo the real
bitstream bpp that ``src.eval`` measured on each photo. Folders without it
still make a sheet, which then says that the rate is unknown.

The sheet: a row per image, the origin, then every tag of every run, each tile
captioned with its tag, its PSNR / MS-SSIM against the origin (8-bit, as
``src.eval`` measures) and its bpp. ``--crop N`` adds, under each row, the
center N×N of every tile enlarged (nearest neighbour) so that ringing and blur
are visible. Below the rows, the RD plane: bpp on x, PSNR on y, one labelled
point per tag of each run. Drawn with matplotlib; training writes
``<recon_dir>/report.png`` at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

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


# ---------------------------------------------------------------- the rate beside each tag

RATE_KINDS = ("real", "estimated")  # bytes of a real bitstream x 8 / pixels, or -log2 likelihoods / pixels


def rate_path(recon_dir: Path, tag: str) -> Path:
    return Path(recon_dir) / f"{tag}.json"


def write_rate(recon_dir: Path, tag: str, bpp: float, kind: str, measured_on: str,
               per_image: Optional[Mapping[str, float]] = None, psnr: Optional[float] = None,
               ms_ssim: Optional[float] = None) -> Path:
    """Record the rate of ``recon_dir/tag`` as ``recon_dir/<tag>.json`` (atomic; the PNG layout is untouched).

    ``bpp`` is the rate over the images named by ``measured_on``; ``per_image``
    maps PNG names of the tag to their own bpp. ``psnr`` / ``ms_ssim`` are the
    quality measured on those same images, when they are not the tiles
    themselves (the val set of an epoch), so that an RD point pairs a rate
    with the quality of the same images.
    """
    if kind not in RATE_KINDS:
        raise ValueError(f"rate kind must be one of {RATE_KINDS}, got {kind!r}")
    record: Dict[str, Any] = {"bpp": float(bpp), "kind": kind, "measured_on": measured_on}
    if per_image is not None:
        record["per_image"] = {name: float(v) for name, v in per_image.items()}
    for key, value in (("psnr", psnr), ("ms_ssim", ms_ssim)):
        if value is not None:
            record[key] = float(value)
    text = json.dumps(record, indent=1).encode()
    path = rate_path(recon_dir, tag)
    write_atomic(path, lambda handle: handle.write(text), durable=False)
    return path


def read_rate(recon_dir: Path, tag: str) -> Optional[Dict[str, Any]]:
    """The rate recorded for ``tag``, or None when there is none (a folder from before rates were recorded)."""
    path = rate_path(recon_dir, tag)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["bpp"] = float(record["bpp"])
        record["per_image"] = {str(k): float(v) for k, v in record.get("per_image", {}).items()}
        for key in ("psnr", "ms_ssim"):
            if key in record:
                record[key] = float(record[key])
        numbers = [record["bpp"], *record["per_image"].values(), record.get("psnr", 0.0)]
        if record["kind"] not in RATE_KINDS or not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"kind {record['kind']!r}, bpp {record['bpp']}")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path} is not a rate record of src.recon ({type(err).__name__}: {err})") from None
    return record


def tile_bpp(rate: Optional[Dict[str, Any]], name: str) -> Optional[float]:
    """A tile's bpp: its own when recorded, else the rate of the set it belongs to, else None (unknown)."""
    if rate is None:
        return None
    return rate["per_image"].get(name, rate["bpp"])


def rate_caption(rate: Optional[Dict[str, Any]], name: str) -> str:
    if rate is None:
        return "bpp unknown"
    bpp = tile_bpp(rate, name)
    if name in rate["per_image"]:
        return f"{bpp:.3f} bpp ({'real' if rate['kind'] == 'real' else 'est.'})"
    return f"{bpp:.3f} bpp ({'set mean' if rate['kind'] == 'real' else 'val est.'})"


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
    rates: Dict[str, Optional[Dict[str, Any]]] = field(default_factory=dict)  # tag -> read_rate(), None = unknown


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
    return Run(label, folder, names, tags, {tag: read_rate(folder, tag) for tag in tags})


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
    """``{run label: {tag: [metrics per image]}}``: PSNR / MS-SSIM measured as ``src.eval`` measures, and
    the tile's recorded bpp (None when unknown)."""
    table = {}
    for run in runs:
        origins = images[run.label]["origin"]
        table[run.label] = {tag: [{**quantised_metrics(o.unsqueeze(0), x.unsqueeze(0)),
                                   "bpp": tile_bpp(run.rates.get(tag), name)}
                                  for name, o, x in zip(run.names, origins, images[run.label][tag])]
                            for tag in run.tags}
    return table


def rd_point(run: Run, tag: str, metrics: Sequence[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    """The tag's point on the RD plane: rate and PSNR of the same images; None when the rate is unknown.

    With per-image rates these are the tiles (means over them); with the rate
    of a set (an epoch's val set) and that set's PSNR, the set.
    """
    rate = run.rates.get(tag)
    if rate is None:
        return None
    if "psnr" in rate and not set(run.names) <= set(rate["per_image"]):
        return {"bpp": rate["bpp"], "psnr": rate["psnr"]}
    return {"bpp": sum(m["bpp"] for m in metrics) / len(metrics),
            "psnr": sum(m["psnr"] for m in metrics) / len(metrics)}


def rate_sources(runs: Sequence[Run]) -> List[str]:
    """One line per distinct way the rates of the sheet were measured (for the RD plot's caption)."""
    seen = []
    for run in runs:
        for rate in run.rates.values():
            if rate is not None:
                text = f"{'real bitstream' if rate['kind'] == 'real' else 'likelihood estimate'}, {rate['measured_on']}"
                if text not in seen:
                    seen.append(text)
    return seen


def draw_rd(ax, runs: Sequence[Run], table) -> None:
    """bpp on x, PSNR on y, one labelled point per tag and a colour per run; says which rates are unknown."""
    unknown = []
    drawn = 0
    for index, run in enumerate(runs):
        color = f"C{index}"
        points = {tag: rd_point(run, tag, table[run.label][tag]) for tag in run.tags}
        unknown += [f"{run.label}:{t}" if len(runs) > 1 else t for t, point in points.items() if point is None]
        known = {t: point for t, point in points.items() if point is not None}
        for tag, point in known.items():
            hollow = run.rates[tag]["kind"] == "estimated"
            ax.plot(point["bpp"], point["psnr"], "o", color=color, markerfacecolor="none" if hollow else color,
                    label=run.label if tag == next(iter(known)) else None)
            ax.annotate(tag, (point["bpp"], point["psnr"]), textcoords="offset points", xytext=(5, 4), fontsize=8,
                        color=color)
        drawn += len(known)
    sources = rate_sources(runs)
    ax.set_xlabel("bpp" + (f" ({'; '.join(sources)})" if sources else ""), fontsize=9)
    ax.set_ylabel("PSNR [dB]", fontsize=9)
    kinds = {r["kind"] for run in runs for r in run.rates.values() if r is not None}
    ax.set_title("rate-distortion: one point per tag" + (" (filled: real bitstream, hollow: estimate)"
                                                         if len(kinds) > 1 else ""), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.margins(x=0.25, y=0.25)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if unknown:
        shown = ", ".join(unknown[:6]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 6 else "")
        where = "every tag" if not drawn else shown
        ax.text(0.5, 0.5 if not drawn else 0.04, f"rate unknown for {where}\n(no <tag>.json beside the recon "
                "folder): no point drawn", transform=ax.transAxes, ha="center",
                va="center" if not drawn else "bottom", fontsize=9, color="0.3")


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    size = min(size, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top:top + size, left:left + size]


def draw_sheet(runs: Sequence[Run], images, table, out: Path, crop: int = 0) -> Path:
    """The sheet: image rows (and zoom rows), each tile captioned with PSNR / MS-SSIM / bpp, then the RD plot."""
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
                caption = (f"{title}\n{m['psnr']:.2f} dB / MS-SSIM {m['ms_ssim']:.4f}\n"
                           f"{rate_caption(run.rates.get(tag), run.names[index])}")
            else:
                continue
            for sub in range(per_image):
                ax = fig.add_subplot(grid[index * per_image + sub, col])
                shown = image if sub == 0 else center_crop(image, crop)
                ax.imshow(shown.permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(caption if sub == 0 else f"center {min(crop, *image.shape[-2:])} px", fontsize=9)
    draw_rd(fig.add_subplot(grid[rows, :]), runs, table)
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
            known = [m["bpp"] for m in metrics if m["bpp"] is not None]
            rate = f"mean bpp {sum(known) / len(known):.4f}" if known else "rate unknown (no rate record)"
            print(f"{label} {tag}: mean PSNR {psnr:.2f} dB, {rate}, over {len(metrics)} images")
    print(f"sheet -> {out}")
    return table


if __name__ == "__main__":
    run_cli(main)
