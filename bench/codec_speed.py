"""Encode / decode time per megapixel of the shipped codec, against CompressAI's own compress / decompress.

    python -m bench.codec_speed --ckpt bench_out/rd_study/npu_all/q3/best_loss.pt \\
        --eval_dir ../shared/data/kodak --calib_dir ../shared/data/minicoco/train2017 --work_dir bench_out/codec

Rows: the PyTorch model through ``compress`` / ``decompress`` (``src.eval``'s
path), then the bundle (``scripts.codec``'s path: pad, graph, rANS, header /
header, rANS, graph, crop) for FP32 and INT8 (w8a8, a16w8), with the decoder's
ConvTranspose as trained and with its sub-pixel rewrite, on onnxruntime and
OpenVINO. Each figure is the median over ``--repeat`` passes (after one
warm-up pass) of the time to code the first ``--max_images`` images whole,
divided by their megapixels; every library at its default thread count.
Also printed: each row's round trip (PSNR, file bpp), and whether the FP32
bundle's files are the bits ``src.eval`` counts (header aside).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from bench.classic_codecs import bundle_folder, ensure_bundle
from src.cli import run_cli
from src.codec.bundle import MANIFEST, Codec, load_bundle, psnr
from src.codec.format import HEADER
from src.codec.roundtrip import bitstream_roundtrip
from src.codec.runtimes import RUNTIMES
from src.data import image_files
from src.eval import load_model
from src.images import load_rgb

PRECISIONS, UPSAMPLES = ("fp32", "w8a8", "a16w8"), ("convtranspose", "subpixel")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--eval_dir", required=True, help="whole images to time (e.g. Kodak)")
    p.add_argument("--max_images", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--skip_missing", action="store_true", help="time only the bundles already in --work_dir")
    p.add_argument("--build_only", action="store_true",
                   help="only write the bundles (slow, run it niced); a later run times them")
    p.add_argument("--calib_dir", required=True, help="INT8 calibration photos (not the eval images)")
    p.add_argument("--calib_count", type=int, default=32)
    p.add_argument("--input_size", type=int, default=256)
    p.add_argument("--verify_dir", default=None)
    p.add_argument("--work_dir", default="bench_out/codec")
    return p


def median_pass(step: Callable[[int], None], count: int, repeat: int) -> float:
    """Median over ``repeat`` timed passes (one warm-up first) of ``step(i)`` for every image i."""
    times = []
    for index in range(repeat + 1):
        start = time.perf_counter()
        for i in range(count):
            step(i)
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_pytorch(ckpt: Path, images: Sequence[np.ndarray], repeat: int) -> Dict:
    model, _, _ = load_model(ckpt, torch.device("cpu"))
    tensors = [torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in images]
    coded = [bitstream_roundtrip(model, x) for x in tensors]
    with torch.no_grad():
        padded = [c["x_padded"] for c in coded]
        compressed = [model.compress(x) for x in padded]
        enc = median_pass(lambda i: model.compress(padded[i]), len(images), repeat)
        dec = median_pass(lambda i: model.decompress(compressed[i]["strings"], compressed[i]["shape"]),
                          len(images), repeat)
    return {"enc_s": enc, "dec_s": dec, "bits": [c["bits"] for c in coded],
            "x_hat": [np.rint(c["x_hat"][0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
                      for c in coded]}


def time_bundle(folder: Path, runtime: str, images: Sequence[np.ndarray], repeat: int) -> Dict:
    coder = Codec(load_bundle(folder), runtime)
    files = [coder.encode(image) for image in images]
    decoded = [coder.decode(data) for data in files]
    enc = median_pass(lambda i: coder.encode(images[i]), len(images), repeat)
    dec = median_pass(lambda i: coder.decode(files[i]), len(images), repeat)
    return {"enc_s": enc, "dec_s": dec, "files": files, "decoded": decoded}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    ckpt = Path(args.ckpt)
    files = image_files(Path(args.eval_dir), "eval image")[: args.max_images]
    images = [np.array(load_rgb(f)) for f in files]
    megapixels = sum(a.shape[0] * a.shape[1] for a in images) / 1e6
    print(f"{ckpt}: {len(images)} images of {args.eval_dir} ({megapixels:.3f} MP), median of {args.repeat} passes, "
          f"torch threads {torch.get_num_threads()}")
    configs = [(precision, upsample) for precision in args.precisions for upsample in UPSAMPLES]
    if args.build_only:
        for precision, upsample in configs:
            ensure_bundle(ckpt, bundle_folder(Path(args.work_dir), ckpt, precision, upsample), precision, args,
                          upsample)
        return {}
    rows: List[Dict] = []
    reference = time_pytorch(ckpt, images, args.repeat)
    rows.append({"codec": "CompressAI compress/decompress (PyTorch)", **reference})
    for precision, upsample in configs:
        if args.skip_missing and not (bundle_folder(Path(args.work_dir), ckpt, precision, upsample)
                                      / MANIFEST).is_file():
            print(f"skipping {precision} {upsample}: no bundle in {args.work_dir}")
            continue
        folder = ensure_bundle(ckpt, bundle_folder(Path(args.work_dir), ckpt, precision, upsample), precision, args,
                               upsample)
        for runtime in RUNTIMES:
            rows.append({"codec": f"bundle {precision} {upsample} {runtime}", "precision": precision,
                         "upsample": upsample, "runtime": runtime,
                         **time_bundle(folder, runtime, images, args.repeat)})
    print("\n| codec | encode ms/MP | decode ms/MP | PSNR (dB) | bpp (file) |\n|---|---|---|---|---|")
    pixels = [a.shape[0] * a.shape[1] for a in images]
    for row in rows:
        decoded = row.get("decoded", reference["x_hat"])
        sizes = [8 * len(f) for f in row["files"]] if "files" in row else row["bits"]
        row["psnr"] = float(np.mean([psnr(a, b) for a, b in zip(images, decoded)]))
        row["bpp"] = float(np.mean([s / n for s, n in zip(sizes, pixels)]))
        print(f"| {row['codec']} | {1000 * row['enc_s'] / megapixels:.0f} | {1000 * row['dec_s'] / megapixels:.0f} "
              f"| {row['psnr']:.3f} | {row['bpp']:.4f} |")
    for row in rows[1:]:
        if row["precision"] == "fp32":
            payload_bits = [8 * (len(f) - HEADER.size) for f in row["files"]]
            same = sum(a == b for a, b in zip(payload_bits, reference["bits"]))
            gap = max(abs(a - b) for a, b in zip(payload_bits, reference["bits"]))
            print(f"{row['codec']}: file minus header = src.eval's bits on {same} of {len(images)} images "
                  f"(largest difference {gap} bits)")
    return {"rows": [{k: v for k, v in r.items() if k not in ("files", "decoded", "x_hat", "bits")} for r in rows]}


if __name__ == "__main__":
    run_cli(main)
