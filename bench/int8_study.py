"""What does INT8 cost the NPU-all codec? Post-training quantisation by profile and range method, in BD-rate.

    python -m bench.int8_study --coco_dir ../shared/data/minicoco --eval_dir ../shared/data/kodak \\
        --work_dir bench_out/rd_study

Built on ``bench.rd_study`` (same work folder, same bases, same budget): for
each rate point it takes the float NPU-all fine-tune and the GDN control of
the RD study (trained first if missing). On held-out whole photos
(``--eval_dir``: never trained on, never calibrated on), ONNX encoder ->
CompressAI's range coder -> ONNX decoder, real bits, it measures:

- ``npu_fp32``: the NPU codec's FP32 symbol-interface graphs;
- ``ptq_minmax_latent``: the PTQ this project shipped before (latent
  interface requantised by the host, UINT8 MinMax on 256-px crops);
- ``w8a8`` and ``a16w8``: ``src.quant.ptq`` with MSE ranges from whole calibration
  images (``--calib_dir``, default COCO_DIR/train2017), and ``w8a8_minmax``
  (the same with MinMax ranges) as the range method's ablation;
- ``gdn_fp32``: the GDN control through ``src.eval`` (CompressAI's own codec).

BD-rate / BD-PSNR of each INT8 curve against ``npu_fp32`` and against
``gdn_fp32`` (``src.rd_curves``). Then, on ``--detail_quality``: the
stability of the ranges (two disjoint halves of the calibration photos, each
method, same evaluation photos) and the per-tensor sensitivity report on
``--sensitivity_images`` evaluation photos. Each model's measurements are
cached in the work folder (``int8_ptq/``), so a rerun only measures what is
missing. Writes ``int8_ptq_study.json`` and ``int8_ptq_study.md`` there.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from bench import rd_study
from bench.common import write_report
from src.cli import run_cli
from src.data import image_files
from src.eval import evaluate_checkpoint, load_model
from src.images import center_crop_tensor, image_tensor, load_rgb
from src.quant.onnx_export import export_graph, part_input, points_report, roundtrip_image
from src.quant.ptq import (ArrayReader, SymbolCodec, calibrate, mean_points, pad_to, quantise_pair, roundtrip_points,
                           run, sensitivity, sensitivity_markdown, session)
from src.quant.symbols import latent_medians, symbol_graphs
from src.rd_curves import bd_markdown, compare_curves, curve_point

INT8_VARIANTS = {"w8a8": ("w8a8", "mse"), "a16w8": ("a16w8", "mse"), "w8a8_minmax": ("w8a8", "minmax")}


# ---------------------------------------------------------------- the baseline
# The PTQ this project shipped before the symbol interface (latent interface, MinMax on UINT8 crops): only this
# study measures it (``ptq_minmax_latent``; docs/int8_study.md), so it lives here; src/ holds one PTQ path.

def quantize_int8(fp32_path: Path, int8_path: Path, calibration: Sequence[np.ndarray]) -> Path:
    """Write a statically quantised copy of ``fp32_path``, calibrated on ``calibration``."""
    input_name = session(fp32_path).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), ArrayReader(input_name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8_path


def quantise_latent(y: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """What the entropy coder hands the decoder: ``round(y - median) + median`` per channel."""
    return (np.round(y - medians) + medians).astype(np.float32)


def encoder_latents(encoder: Path, images: Sequence[np.ndarray], medians: np.ndarray) -> List[np.ndarray]:
    """Quantised latents of the images: the decoder's calibration data."""
    enc = session(encoder)
    return [quantise_latent(run(enc, image), medians) for image in images]


class OnnxCodec:
    """An ONNX encoder and decoder around the model's own entropy coder: ``compress`` / ``decompress``.

    The same two methods as a CompressAI model, so ``src.codec.roundtrip.bitstream_roundtrip``
    codes an image through the exported (FP32 or INT8) graphs and CompressAI's
    range coder, and the bits it counts are a real bitstream's.
    """

    def __init__(self, encoder: Path, decoder: Path, entropy_bottleneck: nn.Module):
        self.encoder, self.decoder, self.entropy_bottleneck = session(encoder), session(decoder), entropy_bottleneck

    def compress(self, x: torch.Tensor) -> Dict[str, Any]:
        y = torch.from_numpy(run(self.encoder, x.numpy()))
        return {"strings": [self.entropy_bottleneck.compress(y)], "shape": y.shape[-2:]}

    def decompress(self, strings: List[List[bytes]], shape) -> Dict[str, torch.Tensor]:
        y_hat = self.entropy_bottleneck.decompress(strings[0], shape)
        return {"x_hat": torch.from_numpy(run(self.decoder, y_hat.numpy())).clamp_(0, 1)}


def latent_pair(model: nn.Module, image: torch.Tensor, folder: Path, opset: int) -> Dict[str, Path]:
    """The float encoder (x -> y) and decoder (y_hat -> x_hat) graphs, dynamic H/W, in ``folder``."""
    paths = {part: folder / f"{part}.onnx" for part in ("encoder", "decoder")}
    for part, path in paths.items():
        export_graph(model, part, part_input(model, part, image), path, opset, dynamic=True)
    return paths


def minmax_latent_ptq(model: nn.Module, image: torch.Tensor, calib_files: List[Path], eval_files: List[Path],
                      input_size: int, opset: int = 13) -> Dict:
    """The PTQ this project shipped before the symbol interface, kept as the study's baseline: the latent
    interface (y out, y_hat in, both requantised by the host's grid), onnxruntime's MinMax on UINT8, calibrated
    on centre crops at ``input_size``. Returns the FP32 and INT8 round-trip points on whole images."""
    held_out = [roundtrip_image(f, input_size, whole=True) for f in eval_files]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32_paths = latent_pair(model, image, tmp, opset)
        images = [center_crop_tensor(f, (input_size, input_size)).numpy() for f in calib_files]
        medians = latent_medians(model).reshape(1, -1, 1, 1).numpy()
        latents = encoder_latents(fp32_paths["encoder"], images, medians)
        int8_paths = {half: quantize_int8(fp32_paths[half], tmp / f"{half}.int8.onnx", calib)
                      for half, calib in (("encoder", images), ("decoder", latents))}
        points = {name: mean_points(OnnxCodec(paths["encoder"], paths["decoder"], model.entropy_bottleneck),
                                    held_out, 64)[0]
                  for name, paths in (("fp32", fp32_paths), ("int8", int8_paths))}
    return points_report(points["fp32"], points["int8"], Path("-"), "ptq-minmax-latent", len(images),
                         len(held_out), "", True)


# ---------------------------------------------------------------- the study

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--coco_dir", required=True, help="COCO root (train2017/, val2017/): fine-tuning data")
    p.add_argument("--eval_dir", required=True, help="held-out whole photos (e.g. Kodak)")
    p.add_argument("--work_dir", default="bench_out/rd_study", help="the RD study's folder (bases, runs)")
    p.add_argument("--qualities", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--calib_dir", default=None, help="PTQ calibration photos (default: COCO_DIR/train2017)")
    p.add_argument("--calib_count", type=int, default=20)
    p.add_argument("--legacy_crop", type=int, default=256, help="crop side of the old PTQ's calibration")
    p.add_argument("--detail_quality", type=int, default=2, help="rate point of the stability and sensitivity runs")
    p.add_argument("--sensitivity_images", type=int, default=2, help="evaluation photos of the sensitivity report")
    p.add_argument("--workers", type=int, default=0)
    return p


def point(mean: Dict, checkpoint: str) -> Dict:
    return curve_point({"bpp_real": mean["bpp"], "psnr": mean["psnr"], "ms_ssim": mean["ms_ssim"]}, checkpoint)


def whole(files: Sequence[Path]) -> List[np.ndarray]:
    return [pad_to(image_tensor(load_rgb(f)).numpy(), 64) for f in files]


def cached(path: Path, measure):
    """``measure()``'s JSON, kept at ``path`` so a rerun reuses it."""
    if path.exists():
        print(f"# reusing {path}")
        return json.loads(path.read_text())
    result = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def measure_ptq(checkpoint: Path, calib_files: List[Path], eval_files: List[Path], legacy_crop: int) -> Dict:
    """Round-trip points of FP32, each INT8 variant, and the old PTQ, for one float NPU checkpoint."""
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    held_out = [image_tensor(load_rgb(f)) for f in eval_files]
    eb = model.entropy_bottleneck
    result: Dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = whole(calib_files)
        fp32 = symbol_graphs(model, torch.from_numpy(images[0]), tmp)
        reference = roundtrip_points(SymbolCodec(fp32["encoder"], fp32["decoder"], eb), held_out)
        result["npu_fp32"] = {k: reference[k] for k in ("psnr", "ms_ssim", "bpp")}
        start = time.perf_counter()
        calib = calibrate(fp32, images, tmp)
        result["calibration_s"] = time.perf_counter() - start
        for name, (profile, method) in INT8_VARIANTS.items():
            pair = quantise_pair(calib, profile, method, tmp / name)
            got = roundtrip_points(SymbolCodec(pair.encoder, pair.decoder, eb), held_out)
            differ = np.mean([float((a != b).mean()) for a, b in zip(got["symbols"], reference["symbols"])])
            result[name] = {"psnr": got["psnr"], "ms_ssim": got["ms_ssim"], "bpp": got["bpp"],
                            "symbols_differ": float(differ), "symbol_bits": pair.symbol_bits,
                            "symbols_outside_int8": pair.symbols_outside_int8, "sixteen_bit": pair.sixteen_bit,
                            "float_islands": pair.float_islands}
            print(f"{checkpoint} {name}: {got['psnr']:.3f} dB {got['bpp']:.4f} bpp "
                  f"(FP32 {reference['psnr']:.3f} dB {reference['bpp']:.4f}); symbols differ {100 * differ:.3f} %",
                  flush=True)
        image = torch.from_numpy(images[0])[..., :legacy_crop, :legacy_crop]
        legacy = minmax_latent_ptq(model, image, calib_files, eval_files, legacy_crop)
        result["ptq_minmax_latent"] = {"psnr": legacy["psnr_int8"], "ms_ssim": legacy["ms_ssim_int8"],
                                       "bpp": legacy["bpp_int8"]}
        result["latent_fp32"] = {"psnr": legacy["psnr_fp32"], "ms_ssim": legacy["ms_ssim_fp32"],
                                 "bpp": legacy["bpp_fp32"]}
    return result


def measure_stability(checkpoint: Path, calib_files: List[Path], eval_files: List[Path]) -> Dict:
    """INT8 cost (PSNR, rate) of w8a8 per range method, calibrated on each half of the calibration photos."""
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    held_out = [image_tensor(load_rgb(f)) for f in eval_files]
    eb = model.entropy_bottleneck
    half = len(calib_files) // 2
    sets = {"A": calib_files[:half], "B": calib_files[half:2 * half]}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = symbol_graphs(model, torch.from_numpy(whole(calib_files[:1])[0]), tmp)
        reference = roundtrip_points(SymbolCodec(fp32["encoder"], fp32["decoder"], eb), held_out)
        for set_name, files in sets.items():
            calib = calibrate(fp32, whole(files), tmp / set_name)
            for method in ("mse", "minmax", "percentile"):
                for profile in ("w8a8", "a16w8"):
                    pair = quantise_pair(calib, profile, method, tmp / set_name / method / profile)
                    got = roundtrip_points(SymbolCodec(pair.encoder, pair.decoder, eb), held_out)
                    rows[f"{profile}/{method}/{set_name}"] = {"psnr_change": got["psnr"] - reference["psnr"],
                                                              "rate_change": got["bpp"] / reference["bpp"] - 1}
                    print(f"stability {profile} {method} set {set_name}: "
                          f"{rows[f'{profile}/{method}/{set_name}']}", flush=True)
    return {"sets": {k: [str(f) for f in v] for k, v in sets.items()}, "rows": rows}


def measure_sensitivity(checkpoint: Path, calib_files: List[Path], eval_files: List[Path]) -> Dict:
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    held_out = [image_tensor(load_rgb(f)) for f in eval_files]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = whole(calib_files)
        fp32 = symbol_graphs(model, torch.from_numpy(images[0]), tmp)
        calib = calibrate(fp32, images, tmp)
        pair = quantise_pair(calib, "w8a8", "mse", tmp / "w8a8")
        rows = sensitivity(calib, pair, model.entropy_bottleneck, held_out, tmp / "trials")
    return {"rows": rows, "eval_images": [str(f) for f in eval_files]}


def stability_markdown(stability: Dict) -> str:
    lines = ["| profile / ranges | set A: PSNR, rate | set B: PSNR, rate | spread (PSNR) |", "| --- | --- | --- | --- |"]
    for profile in ("w8a8", "a16w8"):
        for method in ("mse", "minmax", "percentile"):
            a, b = (stability["rows"][f"{profile}/{method}/{s}"] for s in ("A", "B"))
            lines.append(f"| {profile} / {method} | {a['psnr_change']:+.3f} dB, {100 * a['rate_change']:+.2f} % | "
                         f"{b['psnr_change']:+.3f} dB, {100 * b['rate_change']:+.2f} % | "
                         f"{abs(a['psnr_change'] - b['psnr_change']):.3f} dB |")
    return "\n".join(lines)


def points_table(rows: List[Dict], names: List[str]) -> str:
    lines = ["| q | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['quality']} | " + " | ".join(
            f"{r[n]['psnr']:.3f} dB / {r[n]['bpp']:.4f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    rd_args = rd_study.get_args_parser().parse_args(
        ["--coco_dir", args.coco_dir, "--eval_dir", args.eval_dir, "--work_dir", args.work_dir,
         "--workers", str(args.workers), "--qualities", *map(str, args.qualities)])
    study = rd_study.Study(rd_args)
    study.work.mkdir(parents=True, exist_ok=True)
    study.prepare()
    calib_files = image_files(Path(args.calib_dir or Path(args.coco_dir) / "train2017"), "calibration")
    calib_files = calib_files[: args.calib_count]
    eval_files = image_files(Path(args.eval_dir), "evaluation")
    cache = study.work / "int8_ptq"
    rows, detail = [], None
    for q in args.qualities:
        base = study.base(q)
        npu, gdn = study.finetune("npu_all", q, base), study.finetune("gdn_control", q, base)
        measured = cached(cache / f"q{q}.json", lambda: measure_ptq(npu, calib_files, eval_files, args.legacy_crop))
        gdn_mean = cached(cache / f"gdn_q{q}.json",
                          lambda: evaluate_checkpoint(gdn, eval_files, torch.device("cpu"))["mean"])
        measured["gdn_fp32"] = {"psnr": gdn_mean["psnr"], "ms_ssim": gdn_mean["ms_ssim"], "bpp": gdn_mean["bpp_real"]}
        rows.append({"quality": q, "checkpoint": str(npu), **measured})
        if q == args.detail_quality:
            detail = npu
    names = ["npu_fp32", "ptq_minmax_latent", "w8a8_minmax", "w8a8", "a16w8", "gdn_fp32"]
    curves = {n: [point(r[n], r["checkpoint"]) for r in rows] for n in names}
    against_npu = compare_curves({n: curves[n] for n in ["npu_fp32", "ptq_minmax_latent", "w8a8_minmax", "w8a8",
                                                         "a16w8"]})
    against_gdn = compare_curves({n: curves[n] for n in ["gdn_fp32", "npu_fp32", "ptq_minmax_latent", "w8a8", "a16w8"]})
    text = (f"Round trips on {len(eval_files)} whole images of {args.eval_dir} (real bits); PTQ calibrated on "
            f"{len(calib_files)} whole photos of {calib_files[0].parent}:\n\n{points_table(rows, names)}\n\n"
            f"BD against the FP32 NPU codec (npu_fp32):\n\n{bd_markdown(against_npu)}\n\n"
            f"BD against the FP32 GDN control (gdn_fp32, CompressAI's own codec):\n\n{bd_markdown(against_gdn)}\n")
    symbols = "\n".join(f"- q{r['quality']}: symbols that differ from FP32: " + ", ".join(
        f"{n} {100 * r[n]['symbols_differ']:.3f} %" for n in INT8_VARIANTS) + f"; symbols int{r['w8a8']['symbol_bits']}"
        f" ({r['w8a8']['symbols_outside_int8']} outside int8 on calibration)" for r in rows)
    text += f"\nThe symbol interface:\n\n{symbols}\n"
    result = {"rows": rows, "curves": curves, "bd_vs_npu_fp32": against_npu, "bd_vs_gdn_fp32": against_gdn}
    if detail is not None:
        stability = cached(cache / f"stability_q{args.detail_quality}.json",
                           lambda: measure_stability(detail, calib_files, eval_files))
        text += (f"\nStability (q{args.detail_quality}): INT8 cost against FP32 on the same {len(eval_files)} photos, "
                 f"calibrated on two disjoint halves of the calibration photos:\n\n{stability_markdown(stability)}\n")
        sens = cached(cache / f"sensitivity_q{args.detail_quality}.json",
                      lambda: measure_sensitivity(detail, calib_files, eval_files[: args.sensitivity_images]))
        text += (f"\nSensitivity (q{args.detail_quality}, w8a8 with MSE ranges, {len(sens['eval_images'])} photos): "
                 f"one tensor at a time at 16 bits:\n\n{sensitivity_markdown(sens['rows'])}\n")
        result.update(stability=stability, sensitivity=sens)
    write_report(study.work, "int8_ptq_study", "int8 study", text, result, time.perf_counter() - start)
    return result


if __name__ == "__main__":
    run_cli(main)
