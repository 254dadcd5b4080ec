"""One model through every requested NPU target: graphs, references, worker jobs, round trip, assembled folder.

For one model (a checkpoint, its decoder's upsampling in one ``TARGET_UPSAMPLE`` form) this module:

1. exports the symbol-interface graphs (``src.quant.symbols.symbol_graphs``) and calibrates them as the project does
   (``src.quant.ptq.calibrate``: whole photos; the decoder on the FP32 encoder's symbols);
2. measures the references on the eval photos through the same coder: the FP32 graphs and the project's own
   ONNX INT8 of each precision profile (``quantise_pair`` with MSE ranges), or a QAT checkpoint's own pair;
3. per target and precision: the encoder job, the symbols coded with real bits, the decoder job on the decoded
   symbols (``roundtrip``), and the target's folder assembled (artefacts, ``report.json``, ``report.md``)
   beside the earlier one only once everything succeeded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from src.checkpoint import swap_in_folder
from src.quant.fake_quant import float_twin, is_qat_model
from src.quant.ptq import SymbolCodec, calibrate, half_plan, mean_points, quantise_pair, symbol_bits
from src.quant.qat import export_pair as qat_export_pair, qat_tensor_ranges
from src.quant.scheme import DEFAULT_RANGE_METHOD
from src.quant.symbols import symbol_graphs
from src.targets import jobs, report as reports
from src.targets.registry import Target
from src.targets.rewrites import target_model
from src.targets.roundtrip import ReplayCodec, code_symbols, key, symbol_summary
from src.targets.toolchains import run_worker


@dataclass
class Prepared:
    """One model ready for the targets: its graphs, the project's calibration, and the reference points."""
    label: str
    graphs: Dict[str, Path]
    calibration_images: List[np.ndarray]
    calibration_symbols: List[np.ndarray]
    entropy_bottleneck: nn.Module
    references: Dict[str, Dict]
    latent_channels: int
    range_method: str  # how activation ranges are chosen, for the project's ONNX INT8 and the targets alike
    tensor_ranges: Dict[str, Dict[str, List[float]]]  # part -> ONNX tensor -> [low, high, bits] of the w8a8 plan
    eca_mean: str      # the graph form's ECA mean (src.targets.rewrites.ECA_MEANS)
    qat_ranges: Dict[str, Dict] = None  # a QAT model: per part, how many ranges are its trained ones, which are not


def reference_points(model: nn.Module, graphs: Dict[str, Path], calib, eval_images: Sequence[torch.Tensor],
                     precisions: Sequence[str], range_method: str, folder: Path) -> Dict[str, Dict]:
    """FP32 and the project's ONNX INT8 (per precision; a QAT model: its own pair) through the same coder."""
    eb = model.entropy_bottleneck
    refs = {"fp32": mean_points(SymbolCodec(graphs["encoder"], graphs["decoder"], eb), eval_images, jobs.PAD_MULTIPLE)[0]}
    for precision in precisions:
        if is_qat_model(model):
            pair = qat_export_pair(model, calib.images, folder / f"qat_{precision}")
            name = f"onnx_qat_{pair.precision}"
        else:
            pair = quantise_pair(calib, precision, range_method, folder / f"onnx_int8_{precision}")
            name = f"onnx_int8_{precision}"
        refs[precision] = {**mean_points(SymbolCodec(pair.encoder, pair.decoder, eb), eval_images,
                                         jobs.PAD_MULTIPLE)[0], "source": name}
    return refs


def prepare(model: nn.Module, label: str, upsample: str, calibration: Sequence[torch.Tensor],
            eval_images: Sequence[torch.Tensor], precisions: Sequence[str], folder: Path,
            range_method: str = DEFAULT_RANGE_METHOD, eca_mean: str = "separable") -> Prepared:
    float_model = float_twin(model) if is_qat_model(model) else model
    rewritten = target_model(float_model.eval(), upsample, eca_mean)
    arrays = jobs.padded(calibration)
    graphs = symbol_graphs(rewritten, torch.from_numpy(arrays[0]), folder / "graphs")
    calib = calibrate(graphs, arrays, folder / "calibration")
    refs = (reference_points(model if is_qat_model(model) else rewritten, graphs, calib, eval_images, precisions,
                             range_method, folder / "references") if eval_images else {})
    refs["symbols_outside_int8_calibration"] = symbol_bits(calib.symbols)[1]
    ranges, qat = w8a8_tensor_ranges(calib, range_method), None
    if is_qat_model(model):
        ranges, qat = carry_qat_ranges(model, calib, ranges)
    return Prepared(label, graphs, calib.images, calib.symbols, model.entropy_bottleneck, refs,
                    int(model.entropy_bottleneck.quantiles.shape[0]), range_method, ranges, eca_mean, qat)


def w8a8_tensor_ranges(calib, range_method: str) -> Dict[str, Dict[str, List[float]]]:
    """The project's w8a8 range of every activation (``half_plan``: what ``quantise_pair`` quantises with), by ONNX
    tensor name, per part: a toolchain that reads the ONNX graph with its names (RKNN-Toolkit2) writes them into its
    own quantiser."""
    return {part: {name: [low, high, 8] for name, (low, high) in half_plan(calib, part, "w8a8", range_method)
                   .ranges.items()}
            for part in ("encoder", "decoder")}


def carry_qat_ranges(model: nn.Module, calib, ranges: Dict[str, Dict[str, List[float]]]) -> tuple:
    """A QAT model's trained scales in place of the PTQ ranges wherever the target graph's tensor is one of its sites
    (``qat_tensor_ranges``); returns the ranges and, per part, what came from QAT and what kept the PTQ rule."""
    carried, summary = {}, {}
    for part, table in ranges.items():
        carried[part], kept = qat_tensor_ranges(model, calib.sources[part], table)
        summary[part] = {"qat_scales": len(table) - len(kept), "ptq_ranges": sorted(kept)}
    return carried, summary


def run_part(prep: Prepared, target: Target, precision: str, part: str, spec: Dict, stage: Path,
             cache_root: Path) -> Dict:
    if precision == "w8a8":
        spec = {**spec, "tensor_ranges": prep.tensor_ranges[part]}
    job = jobs.write_job(stage / f"{part}_job.json", target.name, precision, {part: spec}, stage / part,
                         cache_dir=cache_root / f".cache-{target.toolchain}", range_method=prep.range_method)
    return run_worker(target.toolchain, job)


def measure_target(prep: Prepared, target: Target, precision: str, eval_images: Sequence[torch.Tensor],
                   shapes: Dict[str, List[int]], stage: Path, cache_root: Path) -> Dict:
    """Both parts compiled for ``target`` and the codec's round trip through them; the merged report.

    ``cache_root`` holds each toolchain's content-addressed cache (what does not depend on the target variant).
    Without eval images the parts are compiled and reported only (``roundtrip`` None).
    """
    if not eval_images:
        return compile_only(prep, target, precision, shapes, stage, cache_root)
    eval_arrays = jobs.padded(eval_images)
    enc_spec = jobs.encoder_part(prep.graphs, jobs.write_arrays(stage / "enc_calib.npz", prep.calibration_images),
                                 jobs.write_arrays(stage / "enc_eval.npz", eval_arrays), shapes["encoder"])
    enc = run_part(prep, target, precision, "encoder", enc_spec, stage, cache_root)
    symbols = jobs.read_arrays(stage / "encoder" / "encoder_outputs.npz")
    coded = [code_symbols(prep.entropy_bottleneck, s) for s in symbols]
    dec_spec = jobs.decoder_part(prep.graphs, jobs.write_arrays(stage / "dec_calib.npz", prep.calibration_symbols),
                                 jobs.write_arrays(stage / "dec_eval.npz", [d for _, d in coded]), shapes["decoder"])
    dec = run_part(prep, target, precision, "decoder", dec_spec, stage, cache_root)
    x_hats = jobs.read_arrays(stage / "decoder" / "decoder_outputs.npz")
    codec = ReplayCodec(prep.entropy_bottleneck, {key(a): s for a, (s, _) in zip(eval_arrays, coded)},
                        {key(d): x for (_, d), x in zip(coded, x_hats)})
    point, rows = mean_points(codec, eval_images, jobs.PAD_MULTIPLE)
    return {"model": prep.label, "target": target.name, "precision": precision, "toolchain": enc["toolchain"],
            "form": form(prep, target),
            "parts": {**enc["parts"], **dec["parts"]},
            "roundtrip": {"target": point, "per_image": rows, "fp32": prep.references["fp32"],
                          "project_int8": prep.references[precision],
                          "symbols": {**symbol_summary(symbols),
                                      "outside_int8": int(sum(((s < -128) | (s > 127)).sum() for s in symbols)),
                                      "outside_int8_calibration": prep.references["symbols_outside_int8_calibration"]},
                          "eval_images": len(eval_images)}}


# Toolchains whose worker writes the job's ``tensor_ranges`` (ONNX names) into its quantiser; the Ethos-U worker
# chooses each TFLite tensor's range from its own histograms (onnx2tf's tensors have no ONNX names).
RANGES_BY_NAME = ("rknn",)


def form(prep: Prepared, target: Target) -> Dict:
    """What the target was given beside the graphs: ECA's mean form, the range method, a QAT model's scales."""
    given = {"eca_mean": prep.eca_mean, "range_method": prep.range_method}
    if not prep.qat_ranges:
        return given
    if target.toolchain in RANGES_BY_NAME:
        return {**given, "qat_ranges": prep.qat_ranges}
    return {**given, "qat_ranges": "not carried: the toolchain's tensors have no ONNX names; the project's range "
                                   "rule on the QAT model's float weights"}


def compile_only(prep: Prepared, target: Target, precision: str, shapes: Dict[str, List[int]], stage: Path,
                 cache_root: Path) -> Dict:
    enc_spec = jobs.encoder_part(prep.graphs, jobs.write_arrays(stage / "enc_calib.npz", prep.calibration_images),
                                 None, shapes["encoder"])
    dec_spec = jobs.decoder_part(prep.graphs, jobs.write_arrays(stage / "dec_calib.npz", prep.calibration_symbols),
                                 None, shapes["decoder"])
    enc = run_part(prep, target, precision, "encoder", enc_spec, stage, cache_root)
    dec = run_part(prep, target, precision, "decoder", dec_spec, stage, cache_root)
    return {"model": prep.label, "target": target.name, "precision": precision, "toolchain": enc["toolchain"],
            "form": form(prep, target),
            "parts": {**enc["parts"], **dec["parts"]}, "roundtrip": None}


def assemble(result: Dict, stage: Path, target_dir: Path) -> Path:
    """The target's folder: artefacts of both parts, report.json and report.md; replaces an earlier one whole."""
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(dir=target_dir.parent, prefix=f".{target_dir.name}.new."))
    for part in ("encoder", "decoder"):
        for file in sorted((stage / part).iterdir()):
            if file.is_file() and file.name != "report.json" and not file.name.endswith("_outputs.npz"):
                shutil.copy2(file, built / file.name)
    (built / "report.json").write_text(json.dumps(result, indent=2))
    (built / "report.md").write_text(reports.target_markdown(result))
    swap_in_folder(built, target_dir)
    return target_dir
