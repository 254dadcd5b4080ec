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
INT8 codec against FP32 come from ``src.rd_curves``.

``--phase_steps N`` adds the usual QAT order: from each float NPU-all run,
N more steps with ``--qat true`` (QAT INT8 after float), and the same N more
steps in float (FP32 at the same total budget, with its PTQ INT8), so the
QAT phase is compared with an equal amount of float training. Writes
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
from src.rd_curves import bd_markdown, compare_curves, curve_point


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
    p.add_argument("--phase_steps", type=int, default=0,
                   help="also continue each float run N steps with QAT and N steps in float (0 = no)")
    p.add_argument("--phase_lr", type=float, default=1e-4, help="learning rate of those continuations")
    return p


def point(report: Dict, which: str, checkpoint: str) -> Dict:
    """An RD point (``src.rd_curves.curve_point``) from an export_onnx INT8 report: ``which`` is fp32 or int8."""
    mean = {"bpp_real": report[f"bpp_{which}"], "psnr": report[f"psnr_{which}"], "ms_ssim": report[f"ms_ssim_{which}"]}
    return curve_point(mean, checkpoint)


def int8_round_trip(checkpoint: Path, out: Path, args: argparse.Namespace) -> Dict:
    """``scripts.export_onnx --int8 --dynamic`` of the encoder; its INT8 report (kept beside OUT, reused while
    the checkpoint is older than it)."""
    saved = out.with_suffix(".report.json")
    if saved.exists() and saved.stat().st_mtime > checkpoint.stat().st_mtime:
        print(f"# reusing {saved}")
        return json.loads(saved.read_text())
    calib_dir = args.calib_dir or str(Path(args.coco_dir) / "train2017")
    argv = ["--ckpt", str(checkpoint), "--part", "encoder", "--out", str(out), "--dynamic",
            "--input_size", str(args.input_size), "--image", str(sorted(Path(calib_dir).iterdir())[0]),
            "--int8", calib_dir, "--calib_count", str(args.calib_count),
            "--int8_eval_dir", args.eval_dir, "--int8_eval_count", "1000"]
    print(f"$ python -m scripts.export_onnx {' '.join(argv)}", flush=True)
    report = export_onnx.main(argv)["int8"]
    saved.write_text(json.dumps(report))
    return report


def table(rows: List[Dict], codecs: List[str]) -> str:
    """One row per rate point: PSNR / bpp of each codec."""
    lines = ["| q | " + " | ".join(codecs) + " |", "|---|" + "---|" * len(codecs)]
    for r in rows:
        lines.append(f"| {r['quality']} | " + " | ".join(f"{r[c]['psnr']:.3f} dB / {r[c]['bpp']:.4f}" for c in codecs)
                     + " |")
    return "\n".join(lines)


def continue_run(study: rd_study.Study, name: str, quality: int, start: Path, qat: bool,
                 args: argparse.Namespace) -> Path:
    """``--phase_steps`` more steps from a float run's best_loss.pt, with or without QAT."""
    flags = study.run_flags(quality, args.phase_steps) + [
        "--replace_parts", "all", "--lr", str(args.phase_lr), "--lr_warmup_steps", "10", "--qat", str(qat).lower()]
    return study.train("train_finetune_npu.py", study.work / name / f"q{quality}", flags, start)


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
        row = {"quality": q, "fp32": point(ptq, "fp32", str(float_run)),
               "ptq": point(ptq, "int8", str(float_run)), "qat": point(qat, "int8", str(qat_run)),
               "qat_float": point(qat, "fp32", str(qat_run)), "reports": {"ptq": ptq, "qat": qat}}
        if args.phase_steps:
            more = continue_run(study, "npu_all_more_float", q, float_run, False, args)
            phase = continue_run(study, "npu_all_then_qat", q, float_run, True, args)
            more_ptq = int8_round_trip(more, onnx_dir / f"npu_all_more_float_q{q}.onnx", args)
            phase_qat = int8_round_trip(phase, onnx_dir / f"npu_all_then_qat_q{q}.onnx", args)
            row.update({"more_fp32": point(more_ptq, "fp32", str(more)), "more_ptq": point(more_ptq, "int8", str(more)),
                        "then_qat": point(phase_qat, "int8", str(phase))})
            row["reports"].update(more_ptq=more_ptq, then_qat=phase_qat)
        rows.append(row)
    equal = [("npu_all_fp32", "fp32"), ("npu_all_ptq_int8", "ptq"), ("npu_all_qat_int8", "qat"),
             ("npu_all_qat_float", "qat_float")]
    curves = {name: [r[key] for r in rows] for name, key in equal}
    deltas = compare_curves(curves)
    text = (f"Same budget ({study.scale['steps']} steps from each GDN base):\n\n{table(rows, [k for _, k in equal])}\n\n"
            f"BD against npu_all_fp32 ({len(rows)} rate points, {rows[0]['reports']['ptq']['eval_images']} whole "
            f"images of {args.eval_dir}):\n\n{bd_markdown(deltas)}\n")
    own = compare_curves({"npu_all_qat_float": curves["npu_all_qat_float"],
                          "npu_all_qat_int8": curves["npu_all_qat_int8"]})
    text += f"\nQAT INT8 against its own float weights (fake-quant off):\n\n{bd_markdown(own)}\n"
    result = {"rows": rows, "curves": curves, "bd": deltas, "bd_qat_vs_own_float": own}
    if args.phase_steps:
        later = [("npu_all_more_float_fp32", "more_fp32"), ("npu_all_more_float_ptq_int8", "more_ptq"),
                 ("npu_all_then_qat_int8", "then_qat")]
        phase_curves = {name: [r[key] for r in rows] for name, key in later}
        phase_deltas = compare_curves(phase_curves)
        text += (f"\nThen {args.phase_steps} more steps from each float run (lr {args.phase_lr:g}), in float or with "
                 f"QAT:\n\n{table(rows, [k for _, k in later])}\n\nBD against npu_all_more_float_fp32:\n\n"
                 f"{bd_markdown(phase_deltas)}\n")
        result.update(phase_curves=phase_curves, phase_bd=phase_deltas)
    wall = time.perf_counter() - start
    print("\n" + text + f"\nint8 study: {wall:.0f}s wall")
    (study.work / "int8_study.md").write_text(text)
    result["wall_s"] = wall
    (study.work / "int8_study.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    run_cli(main)
