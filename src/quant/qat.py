"""Quantisation-aware training (QAT): a short phase after float training, rounding where the INT8 graph rounds.

The NPU runs g_a (image -> symbols) and g_s (symbols -> image); the entropy
model stays in float on the host. QAT is run the way the field runs it: the
float model is trained first, then a short phase at a low learning rate
(``--qat true --base_checkpoint FLOAT.pt``) trains it with the rounding of the
very graph it will be exported to. Three things make that graph and the
trained model the same:

- **Placement = the exported graph.** PTQ (``src.quant.ptq``) writes the INT8 pair
  with onnxruntime's ``quantize_static`` on the symbol-interface graphs. Here
  each tensor that graph quantises is one *site* of the PyTorch model
  (``qat_sites``): one quantiser after each fused Conv + activation
  (onnxruntime removes the ReLU6 / Clip and quantises once, on the
  activation's range), after pooling, on the NPU blocks' products, gains and
  residual sums (``QuantPoint``), on each ECA gate (``2 * HardSigmoid`` is
  ``Clip(conv')`` in the graph: the site quantises 2x the HardSigmoid), on
  the decoder's input ``y_hat = symbols + medians`` and on ``x_hat``. Nothing
  quantises g_a's output: in the graph that quantiser is the codec's own
  rounding at scale 1 (``SymbolEncoder``), which the entropy bottleneck already
  models in training (noise) and in eval (rounding). ``graph_site`` maps each
  of the ORT graph's quantised tensors to its site; ``placement`` checks
  that the two sets are the same.
- **Scales from PTQ's calibration.** ``calibrate`` runs PTQ itself on the
  float weights (whole calibration photos, ``src.quant.ranges.choose_range``, the
  precision profile) and reads every activation's scale and zero point off the
  written QDQ graph: at step 0 the QAT model *is* the PTQ codec. Weights are
  INT8 per output channel, symmetric on [-127, 127] with the scale of their
  current absolute maximum: the rule ``quantize_static`` applies to the
  exported weights, so the weight grid needs no calibration.
- **Export through the same pipeline.** ``export_pair`` writes the float
  weights' symbol graphs and quantises them with ``quantize_static``, passing
  every activation's QAT scale and zero point as ``TensorQuantOverrides``: the
  shipped graph is the PTQ graph with QAT's weights and scales.

Scales (``--qat_scales``): ``learned`` (the default, docs/qat_study.md)
trains the 8-bit ones with LSQ (torch's learnable fake-quant op) from the
calibrated start, in log space (``LearnedFakeQuantize``: every scale moves by
the same fraction per step, whatever its size); ``frozen`` keeps the
calibrated scales (buffers).
16-bit tensors (``a16w8``) keep their calibrated scales in both modes: their
rounding is ~0.4 % of an 8-bit step, too fine for its scale to be worth learning.

Phases: the model is built with fake-quant off ("uncalibrated"); ``calibrate``
sets the scales and switches it on ("training with frozen / learned
scales"). The flags and scales are in the state dict and the scheme in the
checkpoint's architecture, so a resumed run continues in the same phase with
the same scales (it never recalibrates).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType
from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
from torch import nn

from src.cli import UserError
from src.data import image_files
from src.images import image_tensor, load_rgb
from src.quant.fake_quant import INPUT, activation_precision, activation_quantisers, float_twin, qat_state, set_qparams
from src.quant.ptq import (calibrate as int8_calibrate, float_islands, pad_to, prepared, quantise, quantise_pair, run,
                           session, symbol_bits, symbol_override)
from src.quant.ranges import choose_range
from src.quant.symbols import latent_medians, symbol_graphs




# ---------------------------------------------------------------- the ORT graph's quantised tensors -> sites


def _producers(graph: onnx.GraphProto) -> Dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def graph_site(model: nn.Module, tensor: str, graph: onnx.GraphProto) -> Optional[str]:
    """The site of a tensor of a prepared FP32 symbol graph (``src.quant.ptq``), or None for the symbols.

    The TorchScript exporter names each node by the module path it ran in
    (``/g_a/g_a.1/eca/gate/Clip``); the graph form of the blocks
    (``src.quant.symbols.gates_as_clips``) differs from the training form only in the
    folded gates, and an op inside a block (Mul, Add) writes the tensor its
    ``QuantPoint`` marks: each block names them (``GRAPH_OPS``, ``FOLDED_GATES``). Reshapes carry their input's values (and scale).
    """
    tensor = tensor.removesuffix("_QuantizeLinear_Input")  # how quantize_static renames a quantised graph output
    node = _producers(graph).get(tensor)
    if node is None:
        if tensor not in {i.name for i in graph.input}:
            raise ValueError(f"{tensor} is neither a graph input nor written by a node of the FP32 graph")
        return None if tensor == "symbols" else "g_a" + INPUT  # the image, or the decoder's symbols
    if node.op_type == "Reshape":
        return graph_site(model, node.input[0], graph)
    scope, op = node.name.strip("/").split("/")[:-1], node.op_type
    if not scope:
        if op == "Add":
            return "g_s" + INPUT  # symbols + medians = y_hat
        raise ValueError(f"no QAT site for {tensor} ({op} outside g_a/g_s)")
    path = ".".join([scope[1] if len(scope) > 1 else scope[0]] + scope[2:])
    consumers = [n for n in graph.node if tensor in n.input]
    if node.op_type in ("Conv", "ConvTranspose") and len(consumers) == 1 and consumers[0].op_type in ("Clip", "Relu"):
        return "fused:" + path  # onnxruntime drops the activation and quantises once, on its output
    module = model.get_submodule(path)
    if op in getattr(module, "GRAPH_OPS", {}):
        return f"{path}.{module.GRAPH_OPS[op]}"  # an NPU block's product or sum (src.npu_blocks)
    owner_path, _, child = path.rpartition(".")
    owner = model.get_submodule(owner_path)
    if op == "Clip" and child in getattr(owner, "FOLDED_GATES", {}):
        return f"{owner_path}.{owner.FOLDED_GATES[child]}"  # a block's gate folded into the conv before it
    if path == "g_a." + str(len(model.g_a) - 1):
        return None  # the symbols
    return path


def graph_qparams(model: nn.Module, qdq_path: Path, fp32_path: Path) -> Dict[str, Tuple[float, int, int]]:
    """Site -> (scale, zero point, bits) of every activation the QDQ graph quantises (symbols excluded)."""
    qdq = onnx.load(str(qdq_path)).graph
    fp32 = onnx.load(str(fp32_path)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in qdq.initializer}
    found: Dict[str, Tuple[float, int, int]] = {}
    for node in qdq.node:
        if node.op_type != "QuantizeLinear":
            continue
        site = graph_site(model, node.input[0], fp32)
        if site is None:
            continue
        zero_point = consts[node.input[2]]
        entry = (float(consts[node.input[1]]), int(zero_point), 8 * zero_point.dtype.itemsize)
        if site in found and found[site] != entry:
            raise ValueError(f"{node.input[0]} and another tensor of site {site} have different scales")
        found[site] = entry
    return found


def graph_tensors(fp32_path: Path) -> List[str]:
    """The tensors ``quantize_static`` quantises in a prepared FP32 graph (its calibrator's list)."""
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(fp32_path), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Percentile)  # as src.quant.ptq
        return sorted(calibrator.tensors_to_calibrate)


# ---------------------------------------------------------------- calibration and export


@dataclass
class QatPair:
    """The INT8 pair of a QAT model, its FP32 twin's symbol graphs, and how it was written."""
    encoder: Path
    decoder: Path
    fp32: Dict[str, Path]
    precision: str
    symbol_bits: int
    symbols_outside_int8: int
    float_islands: Dict[str, List[str]]


def calibrate(model: nn.Module, images: Sequence[np.ndarray], range_method: str, folder: Path) -> Dict[str, Any]:
    """PTQ of the model's float weights (``src.quant.ptq``) on whole ``images``; its scales become the QAT scales.

    ``images``: (1, 3, H, W) float arrays, padded to 64. Returns what the log
    and the report say about it (sites, 16-bit tensors, symbols).
    """
    precision = activation_precision(model)
    twin = float_twin(model)
    fp32 = symbol_graphs(twin, torch.from_numpy(images[0]), folder)
    calib = int8_calibrate(fp32, images, folder)
    pair = quantise_pair(calib, precision, range_method, folder / "int8")
    qparams = {**graph_qparams(model, pair.encoder, calib.sources["encoder"]),
               **graph_qparams(model, pair.decoder, calib.sources["decoder"])}
    set_qparams(model, qparams, ablation_qparams(model, calib, range_method))
    return {"sites": len(qparams), "sixteen_bit": sum(b == 16 for _, _, b in qparams.values()),
            "symbol_bits": pair.symbol_bits, "symbols_outside_int8": pair.symbols_outside_int8,
            "images": len(images), "range_method": range_method, "precision": precision}


def ablation_qparams(model: nn.Module, calib: Any, range_method: str) -> Dict[str, Tuple[float, int, int]]:
    """Scales of an ablation's extra sites, from the same histograms and range method (8 bits, onnxruntime's
    scale / zero point rule): the pre-activation convolutions (``double``) and y itself (``latent``: the
    histogram of y - median, widened by the medians' extremes)."""
    wanted = {n for n, fq in activation_quantisers(model).items() if not getattr(fq, "in_graph", True)}
    found = {}
    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.UINT8)
    for half, hists in (("encoder", calib.encoder), ("decoder", calib.decoder)):
        graph = onnx.load(str(calib.sources[half])).graph
        for tensor, hist in hists.items():
            site = graph_site(model, tensor, graph)
            name = site[len("fused:"):] if site and site.startswith("fused:") else (
                f"g_a.{len(model.g_a) - 1}" if site is None and half == "encoder" and tensor == "symbols" else None)
            if name not in wanted:
                continue
            low, high = choose_range(hist, 8, range_method)
            if site is None:
                medians = latent_medians(model)
                low, high = low + float(medians.min()), high + float(medians.max())
            zero_point, scale = compute_scale_zp(np.float32(low), np.float32(high), qmin, qmax)
            found[name] = (float(scale), int(zero_point), 8)
    return found


class ScaleOverrides:
    """``TensorQuantOverrides`` for ``src.quant.ptq.quantise``: each tensor's scale and zero point, as given."""

    def __init__(self, table: Dict[str, List[Dict]]):
        self.table = table

    def overrides(self) -> Dict[str, List[Dict]]:
        return self.table


def overrides_for(model: nn.Module, fp32_path: Path, symbol_bits: int) -> ScaleOverrides:
    """The QAT model's scales for every tensor the prepared graph at ``fp32_path`` quantises."""
    graph = onnx.load(str(fp32_path)).graph
    quantisers = activation_quantisers(model)
    table = {}
    for tensor in graph_tensors(fp32_path):
        site = graph_site(model, tensor, graph)
        if site is None:  # the symbols: integers at scale 1 (the codec's rounding)
            table[tensor] = symbol_override(symbol_bits)
        elif site in quantisers:
            scale, zero_point = quantisers[site].calculate_qparams()
            sixteen = quantisers[site].quant_max > 255
            table[tensor] = [{"quant_type": QuantType.QUInt16 if sixteen else QuantType.QUInt8,
                              "scale": np.array(float(scale), np.float32),
                              "zero_point": np.array(int(zero_point), np.uint16 if sixteen else np.uint8)}]
        elif not site.startswith("fused:"):
            raise ValueError(f"the INT8 graph quantises {tensor} (site {site}), the QAT model does not")
    return ScaleOverrides(table)


def qat_tensor_ranges(model: nn.Module, graph_path: Path, ranges: Dict[str, List[float]]
                      ) -> Tuple[Dict[str, List[float]], List[str]]:
    """``ranges`` ({ONNX tensor: [low, high, bits]} of a target graph) with each tensor that is a QAT site of
    ``model`` set to the range its trained scale and zero point span; returns them and the tensors kept as given.

    For a toolchain that takes ranges by ONNX name (RKNN-Toolkit2). The target graph is the float twin after the
    target rewrites (``src.targets.rewrites``), so some of its tensors have no QAT site (e.g. ECA's mean as a
    ReduceMean, the decoder's residual as a Sub): those keep the range they were given (the project's PTQ rule on
    the same photos), and the caller reports them. A fused convolution's own output keeps its PTQ range too: the
    QAT site is its activation's output, which the target folds into the convolution.
    """
    graph = onnx.load(str(graph_path)).graph
    quantisers = activation_quantisers(model)
    carried, kept = dict(ranges), []
    for tensor, (low, high, bits) in ranges.items():
        try:
            site = graph_site(model, tensor, graph)
        except (ValueError, AttributeError):  # a tensor of the target form with no module path in the QAT model
            site = None
        quantiser = quantisers.get(site) if site else None
        if quantiser is None:
            kept.append(tensor)
            continue
        scale, zero_point = (float(v) for v in quantiser.calculate_qparams())
        carried[tensor] = [(quantiser.quant_min - zero_point) * scale, (quantiser.quant_max - zero_point) * scale,
                           bits]
    return carried, kept


@torch.no_grad()
def export_pair(model: nn.Module, images: Sequence[np.ndarray], folder: Path, opset: int = 13) -> QatPair:
    """The INT8 symbol pair of a QAT model: its float weights' graphs, quantised with its own scales.

    ``images`` (whole, padded to 64) give the example input and the symbol
    bit-width check (int16 symbols where any falls outside int8).
    """
    if qat_state(model) == "uncalibrated":
        raise UserError("this QAT checkpoint was never calibrated (no scales to export): train it with --qat true "
                        "from a float checkpoint first")
    twin = float_twin(model)
    fp32 = symbol_graphs(twin, torch.from_numpy(images[0]), folder, opset)
    encoder = session(fp32["encoder"])
    symbols = [run(encoder, image) for image in images]
    bits, outside = symbol_bits(symbols)
    paths = {}
    for half, source, example in (("encoder", fp32["encoder_centred"], images[0]),
                                  ("decoder", fp32["decoder"], symbols[0])):
        src = prepared(source, folder)
        paths[half] = quantise(src, folder / f"{half}.int8.onnx", overrides_for(model, src, bits), example)
    return QatPair(paths["encoder"], paths["decoder"], fp32, activation_precision(model), bits, outside,
                   {half: float_islands(path) for half, path in paths.items()})


def start_phase(model: nn.Module, calib_dir: Path, count: int, range_method: str, say=print) -> Dict[str, Any]:
    """The engine's one QAT hook (fresh runs): calibrate on whole photos, then train with those scales.

    The first ``count`` photos of ``calib_dir`` by name (the same set on every rank and every rerun).
    """
    files = image_files(calib_dir, "--qat_calib_dir")[:count]
    say(f"QAT phase 1/2: calibrating {len(activation_quantisers(model))} activation quantisers on {len(files)} "
        f"whole photos of {calib_dir} (PTQ of the float weights, {range_method} ranges)")
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as tmp:
        info = calibrate(model, calibration_images(files), range_method, Path(tmp))
    model.to(device)
    say(f"QAT phase 2/2: {info['sites']} quantisers = the INT8 graph's quantised tensors ({info['sixteen_bit']} at "
        f"16 bits, {info['precision']}), symbols int{info['symbol_bits']}; now {qat_state(model)}")
    return info


def calibration_images(files: Iterable[Path]) -> List[np.ndarray]:
    """Whole photos as (1, 3, H, W) float arrays zero-padded to 64, as PTQ calibrates."""
    return [pad_to(image_tensor(load_rgb(f)).numpy(), 64) for f in files]
