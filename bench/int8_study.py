"""What does INT8 cost the NPU-all codec, with post-training quantisation (PTQ) and with QAT?

    python -m bench.int8_study --coco_dir ../shared/data/minicoco --eval_dir ../shared/data/kodak \\
        --work_dir bench_out/rd_study

Built on ``bench.rd_study`` (same work folder, same bases, same budget): for
each rate point it takes the float NPU-all fine-tune of the RD study (run
first if missing) and fine-tunes a QAT NPU-all run (``--qat true``) from the
same GDN base with the same flags and steps. Then, on held-out whole photos
(``--eval_dir``: never trained on, never calibrated on), through
``scripts.export_onnx --int8 --dynamic`` (ONNX encoder -> CompressAI's range
coder -> ONNX decoder, real bits):

- FP32: the float fine-tune's FP32 graphs;
- PTQ INT8: the same model statically quantised by onnxruntime, calibrated
  on ``--calib_count`` crops of ``--calib_dir`` (training photos);
- QAT INT8: the QAT run's QDQ graphs with their learned scales (and, for
  reference, the same weights without fake-quant).

Each codec is a curve over the rate points; BD-rate and BD-PSNR of each
INT8 codec against FP32 come from ``src.rd_curves``. Writes
``int8_study.json`` and ``int8_study.md`` into the work folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench import rd_study
from scripts import export_onnx
from src.cli import UserError, run_cli
from src.rd_curves import bd_markdown, compare_curves, msssim_db


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--coco_dir", required=True, help="COCO root (train2017/, val2017/): fine-tuning data")
    p.add_argument("--eval_dir", required=True, help="held-out whole photos (e.g. Kodak)")
    p.add_argument("--work_dir", default="bench_out/rd_study", help="the RD study's folder (bases, NPU-all runs)")
    p.add_argument("--qualities", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--calib_dir", default=None, help="PTQ calibration photos (default: COCO_DIR/train2017)")
    p.add_argument("--calib_count", type=int, default=64)
    p.add_argument("--input_size", type=int, default=256, help="calibration crop side (graphs are dynamic)")
    p.add_argument("--workers", type=int, default=0)
    return p


def point(report: Dict, which: str, checkpoint: str) -> Dict:
    """An RD point (``src.rd_curves`` form) from an export_onnx INT8 report: ``which`` is fp32 or int8."""
    ms_ssim = report[f"ms_ssim_{which}"]
    return {"checkpoint": checkpoint, "bpp": report[f"bpp_{which}"], "psnr": report[f"psnr_{which}"],
            "ms_ssim": ms_ssim, "ms_ssim_db": msssim_db(ms_ssim)}


def int8_round_trip(checkpoint: Path, out: Path, args: argparse.Namespace) -> Dict:
    """``scripts.export_onnx --int8 --dynamic`` of the encoder; its INT8 report."""
    calib_dir = args.calib_dir or str(Path(args.coco_dir) / "train2017")
    argv = ["--ckpt", str(checkpoint), "--part", "encoder", "--out", str(out), "--dynamic",
            "--input_size", str(args.input_size), "--image", str(sorted(Path(calib_dir).iterdir())[0]),
            "--int8", calib_dir, "--calib_count", str(args.calib_count),
            "--int8_eval_dir", args.eval_dir, "--int8_eval_count", "1000"]
    print(f"$ python -m scripts.export_onnx {' '.join(argv)}", flush=True)
    return export_onnx.main(argv)["int8"]


def table(rows: List[Dict]) -> str:
    head = ("| q | FP32 PSNR | FP32 bpp | PTQ PSNR | PTQ bpp | QAT PSNR | QAT bpp | QAT float self PSNR | "
            "QAT float self bpp |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['quality']} | {r['fp32']['psnr']:.3f} | {r['fp32']['bpp']:.4f} | {r['ptq']['psnr']:.3f} | "
                     f"{r['ptq']['bpp']:.4f} | {r['qat']['psnr']:.3f} | {r['qat']['bpp']:.4f} | "
                     f"{r['qat_float']['psnr']:.3f} | {r['qat_float']['bpp']:.4f} |")
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
    rows = []
    onnx_dir = study.work / "int8_onnx"
    for q in args.qualities:
        base = study.base(q)
        float_run = study.finetune("npu_all", q, base)
        qat_run = study.finetune("npu_all_qat", q, base)
        ptq = int8_round_trip(float_run, onnx_dir / f"npu_all_q{q}.onnx", args)
        qat = int8_round_trip(qat_run, onnx_dir / f"npu_all_qat_q{q}.onnx", args)
        if ptq["method"] != "ptq" or qat["method"] != "qat":
            raise UserError(f"expected a float and a QAT checkpoint, got {ptq['method']} and {qat['method']}")
        rows.append({"quality": q, "fp32": point(ptq, "fp32", str(float_run)),
                     "ptq": point(ptq, "int8", str(float_run)), "qat": point(qat, "int8", str(qat_run)),
                     "qat_float": point(qat, "fp32", str(qat_run)), "reports": {"ptq": ptq, "qat": qat}})
    curves = {name: [r[key] for r in rows] for name, key in
              (("npu_all_fp32", "fp32"), ("npu_all_ptq_int8", "ptq"), ("npu_all_qat_int8", "qat"),
               ("npu_all_qat_float", "qat_float"))}
    deltas = compare_curves(curves)
    wall = time.perf_counter() - start
    text = (f"{table(rows)}\n\nBD against npu_all_fp32 ({len(rows)} rate points, "
            f"{rows[0]['reports']['ptq']['eval_images']} whole images of {args.eval_dir}):\n\n{bd_markdown(deltas)}\n")
    print("\n" + text + f"\nint8 study: {wall:.0f}s wall")
    (study.work / "int8_study.md").write_text(text)
    result = {"rows": rows, "curves": curves, "bd": deltas, "wall_s": wall}
    (study.work / "int8_study.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    run_cli(main)
