"""The shipped codec against JPEG and WebP: RD curves and BD-rate on whole images, real files on both sides.

    python -m bench.classic_codecs --eval_dir ../shared/data/kodak \\
        --curve gdn_control=bench_out/rd_study/gdn_control/q1,...,q4 \\
        --curve npu_all=bench_out/rd_study/npu_all/q1,...,q4 \\
        --calib_dir ../shared/data/minicoco/train2017 --verify_dir ../shared/data/minicoco/val2017 \\
        --work_dir bench_out/codec --json docs/codec_rd.json --plot docs/codec_rd.png

Each checkpoint (or run folder: its ``best_loss.pt``) is exported twice with
``scripts.export_onnx --bundle``: FP32, and INT8 (``--int8_profile``, calibrated on
``--calib_count`` whole images of ``--calib_dir``, never the eval images). Every eval
image is coded whole by ``scripts.codec``'s path (``src.codec.bundle.Codec`` on
``--runtime``): rate is the file's size with its 43-byte header, over the
image's pixels. JPEG (Pillow, ``optimize=True``, 4:2:0) and WebP (Pillow,
``method=6``) sweep their quality; their rate is the file Pillow writes.
Quality on all sides is ``src.losses.quantised_metrics`` of the decoded 8-bit
image (PSNR, MS-SSIM), averaged over images as ``src.eval`` does. BD-rate and
BD-PSNR come from ``src.rd_curves`` (pchip), each curve against JPEG and
against WebP. Bundles already in ``--work_dir`` and newer than their
checkpoint are reused.

Where exporting a bundle per rate point is too slow (each export verifies
on both runtimes), two measured sources stand in, rate raised by the 43-byte
header: ``--eval_json`` (an ``src.eval --curve`` report: the FP32 codec's
files are its bits plus the header, ``tests/test_codec.py``) and
``--int8_study NAME=DIR`` (``bench.int8_study``'s per-quality FP32 / w8a8 /
a16w8 round trips through ``src.quant.ptq``'s graphs and the range coder, the
bundles' path, and its GDN-control evals).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from scripts import export_onnx
from src.cli import UserError, run_cli
from src.codec.bundle import MANIFEST, Codec, load_bundle
from src.codec.format import HEADER
from src.codec.runtimes import RUNTIMES
from src.data import image_files
from src.eval import resolve_checkpoint
from src.images import load_rgb
from src.losses import quantised_metrics
from src.quant.scheme import PROFILES
from src.rd_curves import bd_markdown, compare_curves, curve_point, plot_curves

JPEG_QUALITIES = [5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 90]
WEBP_QUALITIES = [0, 5, 10, 20, 30, 40, 50, 60, 75, 90]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--eval_dir", required=True, help="whole images to code (e.g. Kodak 1-12)")
    p.add_argument("--curve", action="append", default=[], metavar="NAME=CKPT[,CKPT...]",
                   help="a learned codec: one checkpoint or run folder per rate point (repeat per codec)")
    p.add_argument("--eval_json", default=None,
                   help="instead of bundles, the FP32 curves of an src.eval --curve report on the same images "
                        "(e.g. the RD study's rd_study.json): its real-bitstream bits plus the codec's header are "
                        "the codec's files (tests/test_codec.py checks the two agree)")
    p.add_argument("--int8_study", default=None, metavar="NAME=DIR",
                   help="curves from bench.int8_study's per-quality reports on the same eval images: DIR/q<Q>.json "
                        "(NPU-all through src.quant.ptq's graphs + range coder: FP32 and each INT8 profile) and "
                        "DIR/gdn_q<Q>.json (the GDN control, src.eval); rate raised by the codec's header")
    p.add_argument("--calib_dir", default=None, help="INT8 calibration photos (not the eval images)")
    p.add_argument("--qualities", type=int, nargs="+", default=[1, 2, 3, 4], help="for --int8_study")
    p.add_argument("--calib_count", type=int, default=32)
    p.add_argument("--input_size", type=int, default=256, help="export check crop side")
    p.add_argument("--verify_dir", default=None, help="the bundles' verification images (default: calib_dir)")
    p.add_argument("--work_dir", default="bench_out/codec", help="bundles are written (and reused) here")
    p.add_argument("--max_images", type=int, default=0, help="first N eval images (0 = all)")
    p.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
    p.add_argument("--int8_profile", default="w8a8", choices=sorted(PROFILES),
                   help="the INT8 bundles' precision profile (src.quant.ptq)")
    p.add_argument("--no_int8", action="store_true", help="FP32 bundles only")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--markdown", default=None, help="write the tables as markdown here")
    return p


def ensure_bundle(checkpoint: Path, out: Path, precision: str, args: argparse.Namespace,
                  upsample: str = "convtranspose") -> Path:
    """``scripts.export_onnx --bundle OUT`` for ``checkpoint``: ``precision`` fp32, or an INT8 profile
    (``src.quant.scheme.PROFILES``) calibrated on --calib_dir."""
    int8 = precision != "fp32"
    manifest = out / MANIFEST
    if manifest.is_file() and manifest.stat().st_mtime > checkpoint.stat().st_mtime:
        return out
    # INT8 without --verify_dir: export_onnx verifies on CALIB_DIR's images after the calibration ones.
    verify = args.verify_dir or (None if int8 else args.calib_dir)
    argv = ["--ckpt", str(checkpoint), "--bundle", str(out), "--upsample", upsample, "--input_size",
            str(args.input_size)]
    if int8:
        if not args.calib_dir:
            raise UserError("INT8 bundles need --calib_dir (or pass --no_int8)")
        argv += ["--int8", args.calib_dir, "--calib_count", str(args.calib_count), "--precision", precision]
    if verify:
        argv += ["--int8_eval_dir", verify, "--int8_eval_count", "1"]
    elif not int8:
        raise UserError("FP32 bundles need verification images: pass --verify_dir or --calib_dir")
    print(f"$ python -m scripts.export_onnx {' '.join(argv)}", flush=True)
    export_onnx.main(argv)
    return out


def bundle_folder(work: Path, checkpoint: Path, precision: str, upsample: str = "convtranspose") -> Path:
    """Where the benches keep a checkpoint's bundle (``bench.codec_speed`` reuses these)."""
    return work / f"{checkpoint.parent.name}_{precision}_{upsample}"


def metrics(original: np.ndarray, decoded: np.ndarray, size_bytes: int) -> Dict[str, float]:
    x, x_hat = (torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255
                for a in (original, decoded))
    return {**quantised_metrics(x, x_hat), "bpp_real": 8 * size_bytes / (original.shape[0] * original.shape[1])}


def mean_point(rows: Sequence[Dict[str, float]], label: str) -> Dict:
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ms_ssim", "bpp_real")}
    return curve_point(mean, label)


def pillow_point(images: Sequence[np.ndarray], fmt: str, quality: int) -> Dict:
    options = {"JPEG": {"optimize": True}, "WEBP": {"method": 6}}[fmt]
    rows = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt, quality=quality, **options)
        decoded = np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        rows.append(metrics(image, decoded, buffer.tell()))
    return mean_point(rows, f"{fmt.lower()} q{quality}")


def bundle_point(folder: Path, images: Sequence[np.ndarray], runtime: str) -> Dict:
    coder = Codec(load_bundle(folder), runtime)
    rows = []
    for image in images:
        data = coder.encode(image)
        rows.append(metrics(image, coder.decode(data), len(data)))
    return mean_point(rows, str(folder))


def learned_curves(args: argparse.Namespace, images: Sequence[np.ndarray]) -> Dict[str, List[Dict]]:
    curves: Dict[str, List[Dict]] = {}
    for text in args.curve:
        name, _, paths = text.partition("=")
        checkpoints = [resolve_checkpoint(p) for p in paths.split(",") if p]
        if not name or not checkpoints:
            raise UserError(f"--curve {text!r}: expected NAME=CKPT[,CKPT...]")
        for precision in ("fp32",) if args.no_int8 else ("fp32", args.int8_profile):
            points = []
            for ckpt in checkpoints:
                if not ckpt.is_file():
                    raise UserError(f"{ckpt} not found")
                folder = ensure_bundle(ckpt, bundle_folder(Path(args.work_dir) / name, ckpt, precision), precision,
                                       args)
                points.append(bundle_point(folder, images, args.runtime))
                print(f"{name} {precision} {ckpt}: {points[-1]['bpp']:.4f} bpp, {points[-1]['psnr']:.3f} dB, "
                      f"MS-SSIM {points[-1]['ms_ssim']:.4f}", flush=True)
            curves[f"{name}_{precision}"] = points
    return curves


def eval_report_curves(path: Path, files: Sequence[Path], images: Sequence[np.ndarray]) -> Dict[str, List[Dict]]:
    """FP32 curves from an ``src.eval`` JSON report, each image's rate raised by the codec's header."""
    report = json.loads(Path(path).read_text())
    if not report.get("curves"):
        raise UserError(f"{path} holds no curves (run src.eval with --curve)")
    names = [f.name for f in files]
    pixels = {f.name: a.shape[0] * a.shape[1] for f, a in zip(files, images)}
    results = {r["checkpoint"]: r for r in report["results"]}
    curves = {}
    for name, points in report["curves"]["points"].items():
        curve = []
        for point in points:
            rows = results[point["checkpoint"]]["images"]
            if [r["name"] for r in rows] != names:
                raise UserError(f"{path} was measured on other images than {len(names)} of the eval folder")
            rows = [dict(r, bpp_real=r["bpp_real"] + 8 * HEADER.size / pixels[r["name"]]) for r in rows]
            curve.append(mean_point(rows, point["checkpoint"]))
        curves[f"{name}_fp32"] = curve
    return curves


def int8_study_curves(text: str, qualities: Sequence[int], images: Sequence[np.ndarray]) -> Dict[str, List[Dict]]:
    """``NAME=DIR``: bench.int8_study's reports, the header added to each rate.

    ``DIR/q<Q>.json``: the NPU-all codec through ``src.quant.ptq``'s symbol graphs
    and the range coder, FP32 (``npu_fp32``) and each INT8 profile;
    ``DIR/gdn_q<Q>.json`` (where present): the GDN control's ``src.eval`` means.
    """
    name, _, folder = text.partition("=")
    header_bpp = float(np.mean([8 * HEADER.size / (a.shape[0] * a.shape[1]) for a in images]))
    curves: Dict[str, List[Dict]] = {}

    def add(curve: str, mean: Dict, label: str) -> None:
        point = {"psnr": mean["psnr"], "ms_ssim": mean["ms_ssim"],
                 "bpp_real": mean.get("bpp", mean.get("bpp_real")) + header_bpp}
        curves.setdefault(curve, []).append(curve_point(point, label))

    for q in qualities:
        path = Path(folder) / f"q{q}.json"
        if not path.is_file():
            raise UserError(f"{path} not found (bench.int8_study has not measured q{q} yet)")
        report = json.loads(path.read_text())
        for key, suffix in (("npu_fp32", "fp32"), *((p, p) for p in sorted(PROFILES))):
            add(f"{name}_{suffix}", report[key], f"{path} {key}")
    if all((Path(folder) / f"gdn_q{q}.json").is_file() for q in qualities):
        for q in qualities:
            add("gdn_control_fp32", json.loads((Path(folder) / f"gdn_q{q}.json").read_text()),
                str(Path(folder) / f"gdn_q{q}.json"))
    return curves


def points_table(curves: Dict[str, List[Dict]]) -> str:
    lines = ["| codec | point | bpp (file) | PSNR | MS-SSIM | MS-SSIM dB |", "|---|---|---|---|---|---|"]
    for name, points in curves.items():
        for p in sorted(points, key=lambda p: p["bpp"]):
            lines.append(f"| {name} | {Path(p['checkpoint']).name} | {p['bpp']:.4f} | {p['psnr']:.3f} | "
                         f"{p['ms_ssim']:.4f} | {p['ms_ssim_db']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    files = image_files(Path(args.eval_dir), "eval image")
    files = files[: args.max_images] if args.max_images > 0 else files
    images = [np.array(load_rgb(f)) for f in files]
    learned = int8_study_curves(args.int8_study, args.qualities, images) if args.int8_study else {}
    if args.eval_json:
        learned.update(eval_report_curves(Path(args.eval_json), files, images))
    learned.update(learned_curves(args, images))
    classic = {"jpeg": [pillow_point(images, "JPEG", q) for q in JPEG_QUALITIES],
               "webp": [pillow_point(images, "WEBP", q) for q in WEBP_QUALITIES]}
    against = {anchor: compare_curves({anchor: classic[anchor], **learned}) if learned else {} for anchor in classic}
    if learned:
        against["jpeg"]["webp"] = compare_curves({"jpeg": classic["jpeg"], "webp": classic["webp"]})["webp"]
    text = (f"{len(files)} images of {args.eval_dir}, runtime {args.runtime}\n\n{points_table(learned)}\n\n"
            + "\n\n".join(f"BD against {anchor.upper()} (pchip, file bpp):\n\n{bd_markdown(d)}"
                          for anchor, d in against.items() if d))
    print("\n" + text)
    print("\n" + points_table(classic))
    result = {"eval_dir": args.eval_dir, "images": [f.name for f in files], "runtime": args.runtime,
              "classic": classic, "learned": learned, "bd": against,
              "settings": {"jpeg": "Pillow, optimize=True, 4:2:0", "webp": "Pillow, method=6"},
              "wall_s": time.perf_counter() - start}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n\nClassic codecs:\n\n" + points_table(classic) + "\n")
    if args.plot:
        top = 2.5 * max((p["bpp"] for pts in learned.values() for p in pts), default=1.0)
        shown = {**{k: [p for p in v if p["bpp"] <= top] for k, v in classic.items()}, **learned}
        plot_curves(shown, Path(args.plot), title=f"{len(files)} images of {args.eval_dir} (whole files, "
                                                  f"{args.runtime})")
    print(f"classic codecs bench: {result['wall_s']:.0f}s wall")
    return result


if __name__ == "__main__":
    run_cli(main)
