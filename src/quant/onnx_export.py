"""ONNX export of the encoder/decoder, its checks, and INT8 (PTQ with onnxruntime, QAT's QDQ graphs).

``scripts.export_onnx`` is the command-line front; benches and tests use these
functions. Every export is checked (onnxruntime against PyTorch on a real
image); for the NPU variant the graphs must be free of ``NPU_FORBIDDEN_OPS``.

INT8 is why the NPU blocks exist: integer NPUs run convolutions, adds,
multiplies and clips in INT8, but GDN's division and square root stay in
float (or do not run at all). Post-training quantisation is ``src.quant.ptq``
(the symbol interface, precision profiles, ranges from whole images); a QAT
checkpoint exports as the same QDQ graph with its learned scales
(``src.quant.qat``). The encoder -> entropy coder -> decoder round
trip then measures what INT8 costs, in PSNR and in real bits: the encoder's
quantisation noise lands in the latent and is paid in rate, so a PSNR drop
alone hides most of the cost.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from src.images import center_crop_tensor, image_tensor, load_rgb
from src.quant.fake_quant import activation_quantisers, is_qat_model
from src.quant.ptq import (SymbolCodec, calibrate, pad_to, quantise_pair, roundtrip_points, sensitivity,
                           sensitivity_markdown, symbol_bits)
from src.quant.qat import export_pair as qat_export_pair
from src.quant.scheme import DEFAULT_PROFILE, DEFAULT_RANGE_METHOD, PROFILES
from src.quant.symbols import latent_medians, symbol_graphs

NPU_FORBIDDEN_OPS = ("Div", "Sqrt", "Pow", "Exp", "Log", "Sigmoid", "Tanh", "Erf", "Softplus")
MAX_ABS_ERROR = 1e-3


# ---------------------------------------------------------------- graphs

class FullForward(nn.Module):
    """``model.forward`` as ONNX can carry it: (y, x_hat, likelihoods of y).

    y (the latent before rounding) is an output too: rounding turns a 1e-7
    difference at a .5 boundary into a whole quantisation step, so the full
    graph is verified on y, and x_hat / likelihoods are reported for reference.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return self.model.g_a(x), out["x_hat"], next(iter(out["likelihoods"].values()))


def export_graph(model: nn.Module, part: str, example: torch.Tensor, out: Path, opset: int,
                 dynamic: bool) -> Tuple[nn.Module, List[str]]:
    module = {"encoder": model.g_a, "decoder": model.g_s, "full": FullForward(model)}[part]
    inputs = ["y_hat"] if part == "decoder" else ["x"]
    outputs = {"encoder": ["y"], "decoder": ["x_hat"], "full": ["y", "x_hat", "likelihoods"]}[part]
    axes = {name: {2: "height", 3: "width"} for name in inputs + outputs} if dynamic else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is the one that targets opset 13 without onnxscript.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        # QAT's fake-quant branches on its on/off flag, a constant of the exported model.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), str(out), input_names=inputs, output_names=outputs,
                          opset_version=opset, dynamic_axes=axes, dynamo=False)
    return module, outputs


def op_histogram(path: Path) -> Dict[str, int]:
    graph = onnx.load(str(path)).graph
    return dict(sorted(collections.Counter(node.op_type for node in graph.node).items()))


@torch.no_grad()
def output_errors(module: nn.Module, path: Path, example: torch.Tensor) -> Dict[str, float]:
    """Max abs error of each graph output, onnxruntime against PyTorch."""
    expected = module(example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    names = [o.name for o in session.get_outputs()]
    return {n: float(np.abs(g - e.numpy()).max()) for n, g, e in zip(names, got, expected)}


def part_input(model: nn.Module, part: str, image: torch.Tensor) -> torch.Tensor:
    """The export input for ``part``: the image, or for the decoder the latent the entropy coder hands it,
    ``y_hat = round(y - median) + median`` per channel."""
    if part != "decoder":
        return image
    with torch.no_grad():
        medians = latent_medians(model).reshape(1, -1, 1, 1)
        return torch.round(model.g_a(image) - medians) + medians


# ---------------------------------------------------------------- INT8

def roundtrip_image(path: Path, input_size: int, whole: bool) -> torch.Tensor:
    """A round-trip image: the whole photo (for a dynamic graph), else its centre crop at ``input_size``."""
    if not whole:
        return center_crop_tensor(path, (input_size, input_size))
    return image_tensor(load_rgb(path))


def int8_report(model: nn.Module, part: str, out: Path, image: torch.Tensor, calib_files: List[Path],
                eval_files: List[Path], eval_from: str, input_size: int, dynamic: bool, opset: int = 13,
                calib_source: str = "", profile: str = DEFAULT_PROFILE, range_method: str = DEFAULT_RANGE_METHOD,
                with_sensitivity: bool = False) -> Dict:
    """PSNR and real bpp of the INT8 encoder -> entropy coder -> decoder round trip against FP32.

    PTQ (``src.quant.ptq``): symbol-interface graphs, calibrated on the whole
    CALIB_DIR images, quantised with the precision ``profile`` and per-tensor
    ranges by ``range_method``; the INT8 graph of ``--part`` is kept at
    OUT.int8.onnx (input ``x`` -> output ``symbols`` for the encoder, ``symbols``
    -> ``x_hat`` for the decoder). FP32 is the same symbol interface in float,
    so the two codecs differ by quantisation alone.
    QAT: the same graphs and pipeline with the checkpoint's own scales
    (``qat_int8_report``); FP32 is its float weights.
    """
    if is_qat_model(model):
        return qat_int8_report(model, part, out, image, eval_files, eval_from, input_size, dynamic, opset)
    held_out = [roundtrip_image(f, input_size, whole=dynamic) for f in eval_files]
    calibration = [pad_to(image_tensor(load_rgb(f)).numpy(), 64) for f in calib_files]
    int8_path = out.with_suffix(".int8.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = symbol_graphs(model, image, tmp, opset)
        calib = calibrate(fp32, calibration, tmp)
        pair = quantise_pair(calib, profile, range_method, tmp / "int8")
        shutil.copyfile(pair.encoder if part == "encoder" else pair.decoder, int8_path)
        eb = model.entropy_bottleneck
        points = {"fp32": roundtrip_points(SymbolCodec(fp32["encoder"], fp32["decoder"], eb), held_out),
                  "int8": roundtrip_points(SymbolCodec(pair.encoder, pair.decoder, eb), held_out)}
        rows = sensitivity(calib, pair, eb, held_out, tmp / "trials") if with_sensitivity else None
        float_ops = sorted(op for op in op_histogram(int8_path) if op in NPU_FORBIDDEN_OPS)
    fp32_points, q8 = points["fp32"], points["int8"]
    total = sum(s.size for s in fp32_points["symbols"])
    differ = sum(int((a != b).sum()) for a, b in zip(q8["symbols"], fp32_points["symbols"]))
    report = points_report(fp32_points, q8, int8_path, "ptq", len(calibration), len(held_out), eval_from, dynamic)
    report.update(float_only_ops=float_ops, interface="symbols", profile=profile, range_method=range_method,
                  sixteen_bit=pair.sixteen_bit, symbol_bits=pair.symbol_bits,
                  symbols_outside_int8_calibration=pair.symbols_outside_int8,
                  symbols_outside_int8_eval=symbol_bits(fp32_points["symbols"])[1],
                  symbols_differ=differ / max(total, 1), float_islands=pair.float_islands[part],
                  float_islands_other_half=pair.float_islands["decoder" if part == "encoder" else "encoder"],
                  sensitivity=rows)
    sixteen = sum(len(v) for v in pair.sixteen_bit.values())
    print(f"INT8 {part} -> {int8_path} (PTQ {profile}: {PROFILES[profile]}; ranges by {range_method} on "
          f"{len(calibration)} whole images of {calib_source}; {sixteen} tensors at 16 bits; symbols int"
          f"{pair.symbol_bits}, {pair.symbols_outside_int8} outside int8 on the calibration images)")
    print_round_trip(report, part, input_size)
    print(f"symbols that differ from the FP32 codec's: {100 * report['symbols_differ']:.3f} % of {total:,}")
    for half, islands in pair.float_islands.items():
        if islands:
            print(f"float islands in the INT8 {half} (ops outside DequantizeLinear -> op -> QuantizeLinear): "
                  + ", ".join(islands))
    if float_ops:
        print(f"ops left in float in the INT8 {part}: {', '.join(float_ops)}")
    if rows is not None:
        print("sensitivity (one tensor at a time at 16 bits, against this graph):\n" + sensitivity_markdown(rows))
    return report


def points_report(fp32: Dict, q8: Dict, int8_path: Path, method: str, calib_count: int, eval_count: int,
                  eval_from: str, whole: bool) -> Dict:
    """The FP32-vs-INT8 round trip as the report's flat keys."""
    return {"int8_path": str(int8_path), "method": method, "calib_images": calib_count, "eval_images": eval_count,
            "eval_from": eval_from, "whole_images": bool(whole),
            "psnr_fp32": fp32["psnr"], "psnr_int8": q8["psnr"], "psnr_drop": fp32["psnr"] - q8["psnr"],
            "bpp_fp32": fp32["bpp"], "bpp_int8": q8["bpp"], "rate_change": q8["bpp"] / fp32["bpp"] - 1,
            "ms_ssim_fp32": fp32["ms_ssim"], "ms_ssim_int8": q8["ms_ssim"]}


def print_round_trip(report: Dict, part: str, input_size: int) -> None:
    print(f"round trip (encoder -> entropy coder -> decoder) on {report['eval_images']} held-out "
          f"{'whole images' if report['whole_images'] else f'{input_size}px crops'} ({report['eval_from']}): "
          f"FP32 {report['psnr_fp32']:.3f} dB {report['bpp_fp32']:.4f} bpp | INT8 {report['psnr_int8']:.3f} dB "
          f"{report['bpp_int8']:.4f} bpp | PSNR {-report['psnr_drop']:+.3f} dB, rate {100 * report['rate_change']:+.2f} %")


def qat_int8_report(model: nn.Module, part: str, out: Path, image: torch.Tensor, eval_files: List[Path],
                    eval_from: str, input_size: int, dynamic: bool, opset: int) -> Dict:
    """A QAT checkpoint's INT8 pair (``src.quant.qat.export_pair``: PTQ's graphs and pipeline, QAT's weights and scales)
    against its float weights' symbol graphs; OUT.int8.onnx is the ``part`` half. Nothing is calibrated."""
    held_out = [roundtrip_image(f, input_size, whole=dynamic) for f in eval_files]
    int8_path = out.with_suffix(".int8.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pair = qat_export_pair(model, [pad_to(t.numpy(), 64) for t in [image, *held_out]], tmp, opset)
        shutil.copyfile(pair.encoder if part == "encoder" else pair.decoder, int8_path)
        eb = model.entropy_bottleneck
        points = {"fp32": roundtrip_points(SymbolCodec(pair.fp32["encoder"], pair.fp32["decoder"], eb), held_out),
                  "int8": roundtrip_points(SymbolCodec(pair.encoder, pair.decoder, eb), held_out)}
        float_ops = sorted(op for op in op_histogram(int8_path) if op in NPU_FORBIDDEN_OPS)
    report = points_report(points["fp32"], points["int8"], int8_path, "qat", 0, len(held_out), eval_from, dynamic)
    report.update(float_only_ops=float_ops, interface="symbols", profile=pair.precision,
                  quantisers=len(activation_quantisers(model)), symbol_bits=pair.symbol_bits,
                  float_islands=pair.float_islands[part])
    print(f"INT8 {part} -> {int8_path} (QAT {pair.precision}: the PTQ graph with the checkpoint's weights and "
          f"{report['quantisers']} activation scales, no calibration; symbols int{pair.symbol_bits})")
    print_round_trip(report, part, input_size)
    if float_ops:
        print(f"ops left in float in the INT8 {part}: {', '.join(float_ops)}")
    return report
