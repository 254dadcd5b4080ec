"""Does a short QAT phase beat PTQ? QAT from the RD study's float models against the same extra float steps + PTQ.

    python -m bench.qat_study --coco_dir ../shared/data/minicoco --eval_dir ../shared/data/kodak \\
        --study_dir ../study/bench_out/rd_study --work_dir bench_out/qat_study \\
        --converge_steps 1600 --steps 320 --start_ptq --sensitivity

Starts from the RD study's float NPU-all models (``STUDY_DIR/npu_all/qN/last.pt``,
480 float steps each, read only) and its 64-px crops. QAT is a phase for a
*trained* float model; the RD study's were still gaining about 0.05 dB per 80
steps, which a comparison at equal budget would count for the float arm, so
``--converge_steps N`` first trains each of them N more float steps (run
``converged``; the command above uses 1600 at the default lr 1e-4). At equal total
budget, from that start, for each rate point:

- ``float_more``: ``--epochs`` more float epochs from the float model (a
  fresh run from ``--base_checkpoint`` with the QAT phase's lr schedule),
  then PTQ (``src.quant.ptq``, w8a8 and a16w8, MSE ranges, whole calibration photos);
- ``qat_w8a8`` / ``qat_a16w8``: the same epochs as a QAT phase (``--qat true``,
  same flags otherwise), exported through the same PTQ pipeline with the QAT
  scales (``src.quant.qat.export_pair``);
- PTQ of the float model it started from (``start_w8a8`` / ``start_a16w8``:
  QAT's own step 0) and that model in FP32 (``start_fp32``, the anchor).

Every codec is measured the same way: Kodak-like held-out whole photos
(``--eval_dir``), ONNX symbol encoder -> CompressAI's range coder -> ONNX
decoder, real bits (``src.quant.ptq.roundtrip_points``). BD-rate / BD-PSNR against
``start_fp32`` (``src.rd_curves``), and of each QAT profile against
``float_more`` + PTQ of the same profile. On ``--ablation_quality`` the QAT w8a8 run
is repeated with one change at a time: calibrated on training crops instead of
whole photos, the other scale mode, the old double quantiser (``--qat_placement
double``), the old latent grid (``--qat_interface latent``). ``--sensitivity``
adds ``src.quant.ptq.sensitivity`` on the QAT w8a8 model of that rate point.

Every training run is skipped when done (a ``done`` marker) and every
measurement is cached as JSON per model in ``WORK_DIR/measure``, so a rerun
measures only what is missing. Writes ``qat_study.json`` and ``qat_study.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from bench.common import NPU_SCRIPT, write_report
from src.cli import UserError, run_cli
from src.commands import python, run as run_command
from src.data import epochs_for_steps, image_files
from src.eval import load_model
from src.images import image_tensor, load_rgb
from src.quant.fake_quant import float_twin, is_qat_model
from src.quant.ptq import SymbolCodec, calibrate, quantise_pair, roundtrip_points, sensitivity, sensitivity_markdown
from src.quant.qat import calibration_images, export_pair
from src.quant.symbols import symbol_graphs
from src.rd_curves import bd_markdown, compare_curves, curve_point
from src.train_args import zoo_objective

CROP, BATCH = 64, 8  # the RD study's small scale (bench.rd_study.SCALES["small"])
ABLATIONS = {  # name: flags that differ from qat_w8a8
    "calib_crops": None,  # set in main: --qat_calib_dir STUDY_DIR/crops64/train
    "scales_other": None,  # set in main: the other --qat_scales
    "double_quantiser": ["--qat_placement", "double"],
    "latent_grid": ["--qat_interface", "latent"],
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--coco_dir", required=True, help="COCO root (train2017/): default calibration photos")
    p.add_argument("--eval_dir", required=True, help="held-out whole photos (e.g. Kodak), never trained on")
    p.add_argument("--study_dir", required=True, help="the RD study's folder (npu_all/qN/last.pt, crops64/), read only")
    p.add_argument("--work_dir", default="bench_out/qat_study")
    p.add_argument("--qualities", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=80, help="steps of the QAT phase and of the float control")
    p.add_argument("--lr", type=float, default=3e-5, help="lr of both (cosine, no warmup)")
    p.add_argument("--converge_steps", type=int, default=0,
                   help="first train each RD-study model this many more float steps (cosine from --converge_lr): "
                        "the float model both arms start from (0: the RD study's model as it is)")
    p.add_argument("--converge_lr", type=float, default=1e-4, help="lr of the --converge_steps (cosine, no warmup)")
    p.add_argument("--scales", default="learned", choices=("frozen", "learned"),
                   help="QAT's scale mode in the main rows (learned: the recipe's default)")
    p.add_argument("--calib_dir", default=None, help="calibration photos (default: COCO_DIR/train2017)")
    p.add_argument("--calib_count", type=int, default=8, help="calibration photos (PTQ and QAT alike)")
    p.add_argument("--start_ptq", action="store_true", help="also PTQ the float models QAT starts from")
    p.add_argument("--precisions", nargs="+", default=["w8a8", "a16w8"], choices=("w8a8", "a16w8"),
                   help="QAT profiles of the main rows")
    p.add_argument("--ablation_quality", type=int, default=2)
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--report_only", action="store_true",
                   help="train and measure nothing: the report of what is cached (missing entries are left out)")
    p.add_argument("--sensitivity", action="store_true", help="sensitivity report of QAT w8a8 at the ablation point")
    p.add_argument("--sensitivity_images", type=int, default=2)
    return p


class Missing(Exception):
    """--report_only: a run or measurement that is not there yet."""


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        # absolute: the training commands run in the repository root (src.commands.run)
        self.work = Path(args.work_dir).resolve()
        self.data = Path(args.study_dir).resolve() / f"crops{CROP}"
        self.calib_dir = Path(args.calib_dir or Path(args.coco_dir) / "train2017").resolve()

    def flags(self, quality: int, steps: Optional[int] = None, lr: Optional[float] = None) -> List[str]:
        """The RD study's fine-tune flags at this rate point, with the phase's length and lr (or the given ones)."""
        crops = len(list((self.data / "train").glob("*.png")))
        epochs = epochs_for_steps(steps or self.args.steps, crops, BATCH)
        return ["--coco_dir", str(self.data), "--quality", str(quality), "--pretrained", "false",
                "--epochs", str(epochs), "--batch_size", str(BATCH), "--num_workers", "0", "--seed", "0",
                *zoo_objective(quality), "--amp", "false", "--train_scope", "all", "--sched", "cosine",
                "--lr", str(lr or self.args.lr),
                "--lr_warmup_steps", "0", "--replace_parts", "all", "--recon_count", "1", "--recon_every",
                str(epochs), "--log_every", "40"]

    def qat_flags(self, precision: str, scales: Optional[str] = None, calib_dir: Optional[Path] = None,
                  count: Optional[int] = None) -> List[str]:
        return ["--qat", "true", "--qat_precision", precision, "--qat_scales", scales or self.args.scales,
                "--qat_calib_dir", str(calib_dir or self.calib_dir), "--qat_calib_count",
                str(count or self.args.calib_count)]

    def study_model(self, quality: int) -> Path:
        path = Path(self.args.study_dir).resolve() / "npu_all" / f"q{quality}" / "last.pt"
        if not path.exists():
            raise UserError(f"{path} is missing: run bench.rd_study first")
        return path

    def start(self, quality: int) -> Path:
        """The float model both arms start from: the RD study's, trained ``--converge_steps`` further first."""
        if not self.args.converge_steps:
            return self.study_model(quality)
        return self.train("converged", quality, [], origin=self.study_model(quality),
                          flags=self.flags(quality, self.args.converge_steps, self.args.converge_lr))

    def train(self, name: str, quality: int, extra: List[str], origin: Optional[Path] = None,
              flags: Optional[List[str]] = None) -> Path:
        run_dir = self.work / "runs" / name / f"q{quality}"
        if self.args.report_only and not (run_dir / "done").exists():
            raise Missing(name)
        log = run_dir / "train.log"
        while not (run_dir / "done").exists() and log.exists() and time.time() - log.stat().st_mtime < 900:
            print(f"# {run_dir} is being trained by another process; waiting", flush=True)
            time.sleep(60)  # a run started by hand or by another invocation (a log untouched for 15 min is dead)
        if not (run_dir / "done").exists():
            begin = (["--resume", str(run_dir / "last.pt")] if (run_dir / "last.pt").exists()
                     else ["--base_checkpoint", str(origin or self.start(quality))])
            run_command(python(NPU_SCRIPT, *(flags or self.flags(quality)), *extra, "--save_dir", str(run_dir),
                               "--recon_dir", str(run_dir / "recon"), *begin), log=log, append=True)
            (run_dir / "done").write_text("ok\n")
        return run_dir / "last.pt"

    def cached(self, key: str, measure) -> Dict:
        path = self.work / "measure" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        if self.args.report_only:
            raise Missing(key)
        start = time.perf_counter()
        result = dict(measure(), seconds=time.perf_counter() - start)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"{key}: " + ", ".join(f"{k} {v['psnr']:.3f} dB {v['bpp']:.4f} bpp" for k, v in result.items()
                                     if isinstance(v, dict) and "psnr" in v), flush=True)
        return result


SETUP_KEYS = ("study_dir", "converge_steps", "converge_lr", "steps", "lr", "calib_dir", "coco_dir", "calib_count",
              "eval_dir")  # what the cached runs and measurements depend on (run names and cache keys do not say)


def check_setup(work: Path, args: argparse.Namespace) -> None:
    """One work dir, one setup: ``setup.json`` records it, and another setup is refused (its cache would be reused)."""
    setup = {key: str(getattr(args, key)) for key in SETUP_KEYS}
    path = work / "setup.json"
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [f"{key} {saved.get(key)} -> {value}" for key, value in setup.items() if saved.get(key) != value]
        if changed:
            raise UserError(f"{work} holds a study with another setup ({'; '.join(changed)}): its runs and "
                            "measurements would be reused; pass another --work_dir")
    elif not args.report_only:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(setup, indent=1))


def summary(points: Dict) -> Dict:
    return {k: points[k] for k in ("psnr", "ms_ssim", "bpp")}


def measure_float(checkpoint: Path, calib: List[np.ndarray], held_out: List[torch.Tensor], ptq: bool = True) -> Dict:
    """FP32 and (``ptq``) PTQ w8a8 / a16w8 round trips of a float checkpoint."""
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    eb = model.entropy_bottleneck
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = symbol_graphs(model, torch.from_numpy(calib[0]), tmp)
        out["fp32"] = summary(roundtrip_points(SymbolCodec(fp32["encoder"], fp32["decoder"], eb), held_out))
        if not ptq:
            return out
        calibration = calibrate(fp32, calib, tmp)
        for profile in ("w8a8", "a16w8"):
            pair = quantise_pair(calibration, profile, "mse", tmp / profile)
            out[profile] = summary(roundtrip_points(SymbolCodec(pair.encoder, pair.decoder, eb), held_out))
    return out


def measure_qat(checkpoint: Path, held_out: List[torch.Tensor]) -> Dict:
    """The QAT checkpoint's INT8 pair (its own scales) and its float weights, round trips."""
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    if not is_qat_model(model):
        raise UserError(f"{checkpoint} is not a QAT checkpoint")
    eb = model.entropy_bottleneck
    with tempfile.TemporaryDirectory() as tmp:
        pair = export_pair(model, [padded(image) for image in held_out[:2]], Path(tmp))
        return {"int8": summary(roundtrip_points(SymbolCodec(pair.encoder, pair.decoder, eb), held_out)),
                "fp32": summary(roundtrip_points(SymbolCodec(pair.fp32["encoder"], pair.fp32["decoder"], eb),
                                                 held_out)),
                "symbol_bits": pair.symbol_bits, "float_islands": pair.float_islands}


def measure_sensitivity(checkpoint: Path, calib: List[np.ndarray], held_out: List[torch.Tensor]) -> Dict:
    """``src.quant.ptq.sensitivity`` on the QAT model's weights (w8a8 PTQ of them as the base, MSE ranges)."""
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    twin = float_twin(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = symbol_graphs(twin, torch.from_numpy(calib[0]), tmp)
        calibration = calibrate(fp32, calib, tmp)
        pair = quantise_pair(calibration, "w8a8", "mse", tmp / "w8a8")
        return {"rows": sensitivity(calibration, pair, twin.entropy_bottleneck, held_out, tmp / "trials")}


def padded(image: torch.Tensor) -> np.ndarray:
    from src.quant.ptq import pad_to
    return pad_to(image.numpy()[None] if image.dim() == 3 else image.numpy(), 64)


def table(rows: Dict[int, Dict[str, Dict]], names: List[str]) -> str:
    lines = ["| q | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for q, row in sorted(rows.items()):
        lines.append(f"| {q} | " + " | ".join(f"{row[n]['psnr']:.3f} dB / {row[n]['bpp']:.4f}" if n in row else "-"
                                              for n in names) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    begin = time.perf_counter()
    run = Runner(args)
    check_setup(run.work, args)
    calib_files = image_files(run.calib_dir, "calibration")[: args.calib_count]
    calib = calibration_images(calib_files)
    held_out = [image_tensor(load_rgb(f)) for f in image_files(Path(args.eval_dir), "evaluation")]
    other = "learned" if args.scales == "frozen" else "frozen"
    rows: Dict[int, Dict[str, Dict]] = {}
    for q in args.qualities:
        try:
            start = run.cached(f"start_q{q}" + ("_ptq" if args.start_ptq else ""),
                               lambda: measure_float(run.start(q), calib, held_out, args.start_ptq))
        except Missing:
            continue
        row = rows.setdefault(q, {})
        row.update({f"start_{k}": v for k, v in start.items() if isinstance(v, dict)})
        try:
            more = run.train("float_more", q, [])
            measured = run.cached(f"float_more_q{q}", lambda: measure_float(more, calib, held_out))
            row.update(float_more_fp32=measured["fp32"], float_more_w8a8=measured["w8a8"],
                       float_more_a16w8=measured["a16w8"])
        except Missing:
            pass
        for precision in args.precisions:
            try:
                ckpt = run.train(f"qat_{precision}_{args.scales}", q, run.qat_flags(precision))
                got = run.cached(f"qat_{precision}_{args.scales}_q{q}", lambda: measure_qat(ckpt, held_out))
                row[f"qat_{precision}"], row[f"qat_{precision}_float"] = got["int8"], got["fp32"]
            except Missing:
                pass
    q = args.ablation_quality
    ablation_rows: Dict[str, Dict] = {}
    if q in rows and "qat_w8a8" in rows[q] and "float_more_w8a8" in rows[q]:
        ablation_rows["qat_w8a8 (" + args.scales + ")"] = rows[q]["qat_w8a8"]
        ablation_rows["float_more + PTQ w8a8"] = rows[q]["float_more_w8a8"]
        for name in args.ablations:
            if name == "calib_crops":
                extra = run.qat_flags("w8a8", calib_dir=run.data / "train", count=256)
            elif name == "scales_other":
                extra = run.qat_flags("w8a8", scales=other)
            else:
                extra = run.qat_flags("w8a8") + ABLATIONS[name]
            label = f"{name} ({other})" if name == "scales_other" else name
            try:
                ckpt = run.train(f"ablation_{name}_{args.scales}", q, extra)
                got = run.cached(f"ablation_{name}_{args.scales}_q{q}", lambda: measure_qat(ckpt, held_out))
                ablation_rows[label] = got["int8"]
            except Missing:
                pass
    names = [n for n in next(iter(rows.values()), {}) if all(n in r for r in rows.values())]
    curves = {name: [curve_point({"bpp_real": rows[q][name]["bpp"], "psnr": rows[q][name]["psnr"],
                                  "ms_ssim": rows[q][name]["ms_ssim"]}, f"q{q}") for q in sorted(rows)]
              for name in names}
    order = ["start_fp32"] + (["start_w8a8", "start_a16w8"] if args.start_ptq else []) + ["float_more_fp32", "float_more_w8a8", "float_more_a16w8",
             "qat_w8a8", "qat_a16w8", "qat_w8a8_float", "qat_a16w8_float"]
    bd = compare_curves({n: curves[n] for n in order if n in curves}) if len(rows) >= 4 else {}
    same_profile: Dict[str, Dict] = {}
    text = (f"Round trips on {len(held_out)} whole photos of {args.eval_dir} (real bits); calibration: "
            f"{len(calib_files)} whole photos of {run.calib_dir}; QAT and float control: {args.steps} steps, "
            f"lr {args.lr:g} cosine, from {args.study_dir}/npu_all/qN/last.pt"
            + (f" trained {args.converge_steps} more float steps first (lr {args.converge_lr:g} cosine)"
               if args.converge_steps else "") + f"; QAT scales {args.scales}.\n\n"
            f"{table(rows, order)}\n")
    if bd:
        text += f"\nBD against start_fp32 (the FP32 codec QAT started from):\n\n{bd_markdown(bd)}\n"
        # the other bar: QAT against PTQ of the same profile after the same float steps
        for precision in args.precisions:
            pair = {f"float_more_{precision}": curves.get(f"float_more_{precision}"), f"qat_{precision}":
                    curves.get(f"qat_{precision}")}
            if all(pair.values()):
                same_profile.update(compare_curves(pair))
        if same_profile:
            text += ("\nBD of QAT against float_more + PTQ of the same profile (equal budget; < 0 % = QAT needs "
                     f"fewer bits):\n\n{bd_markdown(same_profile)}\n")
    if ablation_rows:
        anchor = ablation_rows["float_more + PTQ w8a8"]
        lines = ["| q%d variant | PSNR | bpp | PSNR vs float_more+PTQ | rate vs float_more+PTQ |" % q,
                 "|---|---|---|---|---|"]
        for name, point in ablation_rows.items():
            lines.append(f"| {name} | {point['psnr']:.3f} dB | {point['bpp']:.4f} | "
                         f"{point['psnr'] - anchor['psnr']:+.3f} dB | {100 * (point['bpp'] / anchor['bpp'] - 1):+.2f} % |")
        text += "\nAblation (one change at a time from QAT w8a8):\n\n" + "\n".join(lines) + "\n"
    result = {"rows": rows, "curves": curves, "bd_vs_start_fp32": bd, "bd_qat_vs_ptq": same_profile,
              "ablation": ablation_rows,
              "args": vars(args)}
    if args.sensitivity and q in rows and "qat_w8a8" in rows[q]:
        ckpt = run.work / "runs" / f"qat_w8a8_{args.scales}" / f"q{q}" / "last.pt"
        sens = run.cached(f"sensitivity_q{q}", lambda: measure_sensitivity(
            ckpt, calib, held_out[: args.sensitivity_images]))
        text += f"\nSensitivity (QAT w8a8 weights, q{q}): one tensor at a time at 16 bits:\n\n" \
                f"{sensitivity_markdown(sens['rows'])}\n"
        result["sensitivity"] = sens
    write_report(run.work, "qat_study", "qat study", text, result, time.perf_counter() - begin)
    return result


if __name__ == "__main__":
    run_cli(main)
