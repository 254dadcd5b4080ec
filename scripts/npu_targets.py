"""Compile the codec for NPU targets with their vendors' toolchains and measure it there, with real bits.

    python -m scripts.npu_targets --ckpt CKPT [CKPT ...] --calib_dir PHOTOS --eval_dir PHOTOS \
        [--targets ethos-u55-256 ethos-u85-256 rk3588] [--precision w8a8 a16w8] \
        [--upsample convtranspose subpixel] [--input_size 768x512] [--out npu_out]
    python -m scripts.npu_targets --curve gdn=q1.pt,q2.pt,q3.pt,q4.pt --curve npu=... --calib_dir ... --eval_dir ...

Per model, target and precision it writes ``OUT/<model>/<target>-<precision>/``: the target's artefacts (Vela's
compiled ``<part>_vela.tflite`` and the int8 ``<part>_int8.tflite``; ``<part>.rknn``), ``report.json`` and
``report.md`` (ops on the NPU, every CPU fallback with the compiler's reason, its estimates for ``--input_size``,
and the codec's round trip on the eval photos through the target's quantised model beside FP32 and the project's
own ONNX INT8), and ``OUT/summary.{json,md}`` over all of them (rows of earlier runs into the same OUT kept,
those measured again replaced). ``--curve NAME=CKPT,...`` names a model's rate points (as ``src.eval --curve``):
each point is measured as above (``OUT/<NAME>-r<k>_<upsample>/``) and ``OUT/curves.{json,md}`` holds the
Bjøntegaard deltas of each target's quantised codec and of the project's ONNX INT8 against the FP32 graphs of the
same points, and of each curve against the first on the same target. Toolchains run in their own venvs
(``./run.sh npu-setup``); see ``docs/npu_targets.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from src.codec.build import check_factorized
from src.codec.bundle import load_bundle
from src.codec.tables import EntropyTables
from src.checkpoint import write_atomic
from src.cli import UserError, run_cli, str2bool
from src.quant.scheme import DEFAULT_RANGE_METHOD, PROFILES, RANGE_METHODS
from src.eval import load_model as load_eval_model
from src.rd_curves import parse_curve
from src.targets import jobs, report
from src.targets.registry import TARGETS, Target, by_form, check_precisions, resolve_targets
from src.targets.rewrites import TARGET_UPSAMPLE
from src.targets.study import Prepared, assemble, measure_target, prepare
from src.targets.toolchains import installed, toolchain_python


def input_size(text: str) -> Tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 768x512, got {text!r}") from None
    return width, height


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Compile the codec for NPU targets and measure it there.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Model")
    g.add_argument("--ckpt", nargs="+", default=[], help="checkpoint(s) of this project (float or QAT) or a "
                   "CompressAI bmshj2018-factorized state dict")
    g.add_argument("--bundle", nargs="+", default=[], help="codec bundle(s) (scripts.export_onnx --bundle): the "
                   "checkpoint its manifest names, checked against the bundle's entropy tables, compiled in the "
                   "bundle's decoder form (subpixel, or the SAME-padded ConvTranspose)")
    g.add_argument("--curve", action="append", default=[], metavar="NAME=CKPT[,CKPT...]",
                   help="one model's rate points, lowest rate first (repeatable; the first curve is the anchor of "
                        "the cross-curve BD-rate on each target, e.g. the GDN control): each point measured as "
                        "--ckpt is, then BD-rate against FP32 per target into OUT/curves.{json,md}")
    g.add_argument("--upsample", nargs="+", default=["convtranspose"], choices=sorted(TARGET_UPSAMPLE),
                   help="decoder upsampling form(s) compiled: " + "; ".join(f"{k}: {v}" for k, v in TARGET_UPSAMPLE.items()))
    g = p.add_argument_group("Photos")
    g.add_argument("--calib_dir", required=True, help="calibration photos (whole images)")
    g.add_argument("--calib_count", type=int, default=10, help="calibration photos used (sorted by name)")
    g.add_argument("--calib_method", default=DEFAULT_RANGE_METHOD, choices=RANGE_METHODS,
                   help="activation ranges of the project's ONNX INT8 and of each target that takes them (Ethos-U: "
                        "written into TFLite's calibration before its quantiser runs; minmax there is TFLite's own)")
    g.add_argument("--eval_dir", default=None, help="held-out photos for the round trip (whole images); without "
                   "it the targets compile and report only")
    g.add_argument("--eval_count", type=int, default=24, help="held-out photos used (sorted by name)")
    g = p.add_argument_group("Targets")
    g.add_argument("--targets", nargs="+", default=None,
                   help=f"of {', '.join(TARGETS)}; default: every target whose toolchain is installed")
    g.add_argument("--precision", nargs="+", default=sorted(PROFILES), choices=sorted(PROFILES))
    g.add_argument("--input_size", type=input_size, default=(768, 512),
                   help="WIDTHxHEIGHT the artefacts are compiled for (the compilers' latency figures)")
    g.add_argument("--allow_fallbacks", type=str2bool, default=False,
                   help="record what the compilers do with the model as results: operators left on the CPU, and "
                        "a converter's or compiler's refusal of a target and precision (a row naming its reason; "
                        "the other targets go on). Default: refuse either in one line naming the operator and "
                        "the compiler's reason, the earlier artefacts kept")
    g.add_argument("--out", default="npu_out", help="output folder")
    return p


def chosen_targets(names: Optional[Sequence[str]]):
    if names:
        return resolve_targets(names)
    found = [t for t in TARGETS.values() if installed(t.toolchain)]
    if not found:
        raise UserError("no NPU toolchain is installed: run `./run.sh npu-setup` (or name --targets)")
    return found


def model_label(arch: Optional[Dict], upsample: str, curve: Optional[str] = None, rate_point: int = 0) -> str:
    """The model's folder under OUT: ``<kind>_<upsample>``, or ``<curve>-r<k>_<upsample>`` for a curve's k-th point."""
    if curve:
        return f"{curve}-r{rate_point}_{upsample}"
    kind = {"none": "gdn", "relu": "relu", "npu": "npu"}[arch["replace"]] if arch else "gdn"
    return f"{kind}_{upsample}"


def bundle_source(folder: str) -> Tuple[str, str]:
    """(checkpoint, decoder form) of a codec bundle: the checkpoint its manifest names, refused in one line unless
    it still holds the entropy tables the bundle was written with.

    The targets compile from the checkpoint, not from the bundle's graphs, because the rewrites that put the graphs
    on the NPUs (``src.targets.rewrites``) are exact rewrites of PyTorch modules, which ONNX graphs no longer are.
    """
    bundle = load_bundle(Path(folder))
    source = bundle.manifest.get("source") or ""
    if not source:
        raise UserError(f"{folder}: its manifest names no checkpoint; pass the checkpoint with --ckpt")
    if not Path(source).is_file():
        raise UserError(f"{folder} was written from {source}, which is not there (a relative path is read from "
                        "the current folder); pass the checkpoint with --ckpt")
    model, _ = load_model(source)
    if EntropyTables.from_entropy_bottleneck(model.entropy_bottleneck).digest() != bundle.tables.digest():
        raise UserError(f"{source} no longer holds the entropy tables of {folder} (trained on after the bundle "
                        "was written?): write the bundle again, or pass the checkpoint with --ckpt")
    return source, "subpixel" if bundle.manifest.get("upsample") == "subpixel" else "convtranspose"


def model_sources(args) -> List[Tuple[str, Optional[str], int, Optional[str]]]:
    """(checkpoint, curve name or None, rate point from 1, decoder form or None for --upsample) of every model to
    measure, in the order given."""
    sources = [(path, None, 0, None) for path in args.ckpt]
    for folder in args.bundle:
        checkpoint, form = bundle_source(folder)
        sources.append((checkpoint, None, 0, form))
    names = set()
    for text in args.curve:
        try:
            name, paths = parse_curve(text)
        except ValueError as error:
            raise UserError(str(error)) from None
        if name in names or not name.replace("_", "").isalnum():
            raise UserError(f"--curve {text!r}: each curve needs its own name of letters, digits and '_'")
        names.add(name)
        sources += [(path, name, k, None) for k, path in enumerate(paths, 1)]
    if not sources:
        raise UserError("name the model: --ckpt CKPT [CKPT ...], --bundle DIR or --curve NAME=CKPT,CKPT,...")
    return sources


def load_model(path: str):
    """The checkpoint's model on the CPU (``src.eval.load_model``: entropy tables as saved, rebuilt if empty),
    refused in one line unless it is a factorized-prior codec (the symbol interface's)."""
    model, arch, _ = load_eval_model(Path(path), torch.device("cpu"))
    check_factorized(model)
    return model, arch


def refuse_fallbacks(result: Dict) -> None:
    """One line naming the first operator the compiler left on the CPU and its reason, with the count."""
    found = [(part, f) for part, report_ in result["parts"].items() for f in report_["fallbacks"]]
    if found:
        part, first = found[0]
        raise UserError(f"{result['model']} on {result['target']} {result['precision']}: {len(found)} operator(s) "
                        f"left on the CPU, first the {part}'s {first['op']} '{first['name']}': {first['reason']} "
                        "(--allow_fallbacks true records them as a result)")


def write_curves(out: Path, rows: Sequence[Dict]) -> List[Dict]:
    """``OUT/curves.{json,md}``: the BD figures over every curve's rate points in the summary; printed too."""
    deltas = report.curve_deltas(rows)
    write_atomic(out / "curves.json", lambda f: f.write(json.dumps(deltas, indent=2).encode()))
    table = report.curves_markdown(deltas)
    write_atomic(out / "curves.md", lambda f: f.write(table.encode()))
    print(table)
    return deltas


def measure_group(prep: Prepared, targets: Sequence[Target], args: argparse.Namespace, eval_images, shapes: Dict,
                  folder: Path, out: Path, ident: Dict) -> List[Dict]:
    """Each target of one graph form and each precision measured on ``prep``; their summary rows. A toolchain's
    refusal is a row with its reason under ``--allow_fallbacks true``, else the one line that stops the run."""
    rows = []
    for target in targets:
        for precision in args.precision:
            print(f"{prep.label}: {target.name} {precision}", flush=True)
            stage = folder / f"{target.name}-{precision}"
            try:
                result = measure_target(prep, target, precision, eval_images, shapes, stage, out)
            except UserError as error:
                if not args.allow_fallbacks:
                    raise
                print(f"{prep.label}: {target.name} {precision} refused by the toolchain: {error}", flush=True)
                rows.append(report.refused_row(prep.label, target.name, precision, str(error), ident))
                continue
            result.update(ident)
            if not args.allow_fallbacks:
                refuse_fallbacks(result)
            assemble(result, stage, out / prep.label / f"{target.name}-{precision}")
            rows.append(report.summary_row(result))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    sources = model_sources(args)
    targets = chosen_targets(args.targets)
    check_precisions(targets, args.precision)
    calibration = jobs.load_photos(Path(args.calib_dir), args.calib_count, "--calib_dir",
                                   minimum=jobs.MIN_CALIBRATION_PHOTOS)
    eval_images = jobs.load_photos(Path(args.eval_dir), args.eval_count, "--eval_dir") if args.eval_dir else []
    models = [(path, curve, k, [form] if form else args.upsample, *load_model(path))
              for path, curve, k, form in sources]
    shapes = {path: jobs.compile_shapes(args.input_size, int(model.entropy_bottleneck.quantiles.shape[0]))
              for path, _, _, _, model, _ in models}
    for toolchain in sorted({t.toolchain for t in targets}):
        toolchain_python(toolchain)  # missing: one line (not a refused row) before any compile
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".work.") as work:
        for path, curve, rate_point, forms, model, arch in models:
            for upsample in forms:
                label = model_label(arch, upsample, curve, rate_point)
                for eca_mean, group in by_form(targets).items():
                    folder = Path(work) / label / eca_mean
                    print(f"{label}: graphs ({eca_mean} ECA mean), calibration and references ({path})", flush=True)
                    prep = prepare(model, label, upsample, calibration, eval_images, args.precision, folder,
                                   args.calib_method, eca_mean)
                    rows += measure_group(prep, group, args, eval_images, shapes[path], folder, out,
                                          dict(checkpoint=str(path), upsample=upsample, curve=curve,
                                               rate_point=rate_point))
    summary = out / "summary.json"
    every = report.merged_rows(json.loads(summary.read_text()) if summary.is_file() else [], rows)
    write_atomic(summary, lambda f: f.write(json.dumps(every, indent=2).encode()))
    table = report.summary_markdown(every)
    write_atomic(out / "summary.md", lambda f: f.write(table.encode()))
    print(table)
    if any(row.get("curve") for row in every):
        write_curves(out, every)
    print(f"npu targets finished in {time.perf_counter() - start:.0f}s; reports in {out}/")
    return rows


if __name__ == "__main__":
    run_cli(main)
