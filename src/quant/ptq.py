"""Post-training INT8 of the codec: symbols across the interface, precision profiles, ranges chosen by their cost.

Three things decide what INT8 costs a learned codec, and each has its place here:

- **The latent interface.** The entropy coder codes ``round(y - median)``.
  The INT8 encoder graph ends at exactly that tensor (``-median`` folded into
  the last convolution's bias) and quantises it at scale 1, zero point 0: the
  quantiser *is* the codec's rounding, and the graph's output are the symbols.
  The decoder graph takes the symbols and adds the medians itself. So the host
  never puts y or y_hat on a grid that does not hold the symbols. Symbols
  outside int8 are counted on the calibration images; a 16-bit interface is
  used where they would clip.
- **Which tensors get 16 bits** (``PROFILES``): ``w8a8`` keeps every
  activation at 8 bits (strict integer NPUs); ``a16w8`` gives 16 bits to the
  main path, the tensors between the stages of g_a / g_s (strided-conv and
  ConvTranspose outputs, the blocks' residual sums) and y_hat, and keeps the
  blocks' insides at 8 bits. Weights are INT8 per output channel in both. This
  is the precision Qualcomm's HTP calls A16W8; ``sensitivity`` measures, tensor
  by tensor, what 16 bits buy, for toolchains that choose their own set.
- **Each activation's range** (``RANGE_METHODS``), from histograms of the
  FP32 graph's tensors on whole calibration images (never the training
  crops, whose statistics differ from the images the codec codes). ``mse``
  (the default) picks per tensor the clipping range whose quantisation error
  (rounding inside, clipping outside) is smallest for that tensor's
  bit-width; ``minmax`` is onnxruntime's default, set by a few outlier pixels;
  ``percentile`` clips a fixed 0.01 % tail on each side. The ranges,
  16-bit types and the fixed symbol scale go to onnxruntime's
  ``quantize_static`` as ``TensorQuantOverrides``: the graphs are written by
  onnxruntime, not edited by hand.

Before export the NPU blocks' HardSigmoid gates are rewritten into the
convolution before them (``gates_as_clips``): ``a + b * HardSigmoid(conv(x))``
is ``Clip(conv'(x), a, a + b)`` with conv' scaled, exactly in real
arithmetic. Conv + Clip is one quantised node in every QDQ toolchain, whereas
onnxruntime leaves HardSigmoid in float (a float island between two integer
ops). ``float_islands`` audits the written graph for any op left outside a
DequantizeLinear -> op -> QuantizeLinear frame.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from compressai.entropy_models import EntropyModel
from compressai.ops import compute_padding
from torch import nn

from src.cli import UserError
from src.codec.roundtrip import bitstream_roundtrip
from src.losses import quantised_metrics
from src.quant.ranges import TensorHistogram, activation_histograms, choose_range
from src.quant.scheme import PROFILES
from src.quant.symbols import DECODER_INPUT, ENCODER_OUTPUT

# Ops that only move or reshape shapes; they compute nothing an integer NPU must quantise.
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Constant", "Cast", "Squeeze", "Slice", "ConstantOfShape"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


# ---------------------------------------------------------------- graphs and sessions


def session(path: Path) -> ort.InferenceSession:
    """An onnxruntime session that computes a QDQ graph by its definition, on any x86 CPU.

    Every rate and quality figure of an INT8 model is measured here, so it must be the model's, not one CPU
    kernel's. onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into integer kernels; on x86 CPUs
    without VNNI (AVX2 only) its u8 x s8 kernels add pairs of products in int16 (``vpmaddubsw``) and saturate,
    as its quantisation docs warn. Measured on an AVX2-only AMD EPYC (onnxruntime 1.32), the w8a8 encoder of
    tests/test_int8.py agreed with the FP32 codec's symbols on 71.6 % of positions with the fused kernels and on
    95.9 % with this option (the 96 % that the earlier sessions' Intel Xeon with AMX/VNNI gave fused; a16w8,
    whose 16-bit tensors take other kernels, 99.0 % either way).
    ``session.disable_quant_qdq`` keeps the Q/DQ pairs and runs the float op between them: the same rounding
    and clipping as the integer graph, without the saturation. (The codec's runtimes in ``src.codec.runtimes``
    keep the fused kernels: they are about speed on the machine at hand.)
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, array: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: array})[0]


def prepared(fp32_path: Path, folder: Path) -> Path:
    """onnxruntime's pre-processing (shape inference, constant folding) before calibration and quantisation."""
    out = folder / (fp32_path.stem + ".prepared.onnx")
    folder.mkdir(parents=True, exist_ok=True)
    quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=True)
    return out


# ---------------------------------------------------------------- profiles and quantisation


def stage_outputs(model_path: Path, transform: str) -> List[str]:
    """The main path of a transform: the output tensor of each top-level stage of g_a / g_s.

    The exporter names nodes by module path (``/g_s/g_s.3/...``): the last
    node of stage i holds its output (a strided conv or ConvTranspose, or a
    block's residual sum). For the decoder the medians' Add before stage 0
    (y_hat) belongs to the main path too.
    """
    graph = onnx.load(str(model_path)).graph
    last: Dict[int, str] = {}
    prefix = f"/{transform}/{transform}."
    for node in graph.node:
        if node.name.startswith(prefix):
            stage = int(node.name[len(prefix):].split("/")[0])
            last[stage] = node.output[0]
    tensors = [last[i] for i in sorted(last)]
    if transform == "g_s":
        tensors += [n.output[0] for n in graph.node if n.op_type == "Add" and DECODER_INPUT in n.input]
    return tensors


def symbol_bits(symbols: Iterable[np.ndarray]) -> Tuple[int, int]:
    """(bits of the symbol interface, symbols outside int8): int8 where every symbol fits, else int16."""
    outside = sum(int(((s < -128) | (s > 127)).sum()) for s in symbols)
    return (8 if outside == 0 else 16), outside


def symbol_override(symbol_bits: int) -> List[Dict]:
    """The symbol tensor's ``TensorQuantOverrides`` entry: integers at scale 1, zero point 0 (the codec's rounding)."""
    wide = symbol_bits != 8
    return [{"quant_type": QuantType.QInt16 if wide else QuantType.QInt8, "scale": np.array(1.0, np.float32),
             "zero_point": np.array(0, np.int16 if wide else np.int8)}]


@dataclass
class QuantPlan:
    """What one graph is quantised with: a range per activation, and which activations get 16 bits."""
    ranges: Dict[str, Tuple[float, float]]
    sixteen_bit: List[str]
    symbol_tensor: str
    symbol_bits: int

    def overrides(self) -> Dict[str, List[Dict]]:
        table = {}
        for name, (low, high) in self.ranges.items():
            entry = {"rmin": np.float32(low), "rmax": np.float32(high)}
            if name in self.sixteen_bit:
                entry["quant_type"] = QuantType.QUInt16
            table[name] = [entry]
        table[self.symbol_tensor] = symbol_override(self.symbol_bits)
        return table


class ArrayReader(CalibrationDataReader):
    """Feeds arrays (each (1, C, H, W) float32) to ``quantize_static`` one by one.

    ``quantise`` passes a single one: every activation's range comes from ``QuantPlan``, the array only lets the
    quantiser run the graph once.
    """

    def __init__(self, input_name: str, arrays: Sequence[np.ndarray]):
        self.input_name = input_name
        self.arrays = iter(arrays)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        array = next(self.arrays, None)
        return None if array is None else {self.input_name: array}


def plan(hists: Dict[str, TensorHistogram], sixteen_bit: Sequence[str], symbol_tensor: str, sym_bits: int,
         method: str) -> QuantPlan:
    ranges = {name: choose_range(h, 16 if name in sixteen_bit else 8, method)
              for name, h in hists.items() if name != symbol_tensor}
    return QuantPlan(ranges, [n for n in sixteen_bit if n in ranges], symbol_tensor, sym_bits)


def quantise(model_path: Path, out: Path, qplan: QuantPlan, example: np.ndarray) -> Path:
    """onnxruntime's ``quantize_static`` (QDQ, INT8 weights per channel) with the plan as tensor overrides.

    Refuses (one line) a written graph with a clipped int32 bias (``clipped_biases``): it would compute another
    function.
    """
    input_name = session(model_path).get_inputs()[0].name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(model_path), str(out), ArrayReader(input_name, [example]), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"TensorQuantOverrides": qplan.overrides()})
    clipped = clipped_biases(out)
    if clipped:
        raise UserError(f"onnxruntime clipped the int32 bias of {', '.join(clipped)} in {out} (input scale x "
                         "weight scale too small for the bias): that graph would compute another function")
    return out


def carried(model_path: Path, tensors: Sequence[str]) -> List[str]:
    """``tensors`` and every Reshape output that carries their values, transitively.

    onnxruntime quantises a Reshape's output with its input's parameters. A plan
    that gives 16 bits to a tensor but not to the Reshape after it has
    onnxruntime size the next convolution's int32 bias for the 8-bit scale
    (its weight-scale adjustment reads the plan) and then quantise it on the
    16-bit one: the bias overflows int32 and is clipped. That is what made an
    ECA gate drop from 0.98 to 0.04 when its pool was tried at 16 bits.
    """
    graph = onnx.load(str(model_path)).graph
    out = list(dict.fromkeys(tensors))
    for name in out:  # grows while it is walked
        out += [n.output[0] for n in graph.node
                if n.op_type == "Reshape" and n.input[0] == name and n.output[0] not in out]
    return out


def clipped_biases(path: Path) -> List[str]:
    """The int32 biases of a QDQ graph that sit at int32's limit: ``quantize_static`` clipped them."""
    graph = onnx.load(str(path)).graph
    dequantised = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    limits = np.iinfo(np.int32)
    clipped = []
    for init in graph.initializer:
        if init.name in dequantised and init.data_type == onnx.TensorProto.INT32:
            values = numpy_helper.to_array(init)
            if values.size and (values.max() >= limits.max or values.min() <= limits.min):
                clipped.append(init.name)
    return clipped


def float_islands(path: Path) -> List[str]:
    """Compute ops of a QDQ graph that read a float tensor not from DequantizeLinear, or write one not to
    QuantizeLinear: the places an integer NPU would have to fall back to float. Shape-only ops are exempt."""
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    islands = []
    for node in graph.node:
        if node.op_type in QDQ_OPS or node.op_type in SHAPE_OPS:
            continue
        reads_float = [i for i in node.input if i and i not in constants and i in producer
                       and producer[i].op_type not in QDQ_OPS | {"Constant"} | SHAPE_OPS]
        reads_input = [i for i in node.input if i in {g.name for g in graph.input}]
        writes_float = [o for o in node.output if o in outputs or any(
            c.op_type not in {"QuantizeLinear"} | SHAPE_OPS for c in consumers.get(o, []))]
        if reads_float or reads_input or writes_float:
            islands.append(f"{node.op_type} {node.name}")
    return islands


# ---------------------------------------------------------------- the INT8 pair


@dataclass
class Int8Pair:
    """The INT8 encoder and decoder of one profile, and what they were quantised with."""
    encoder: Path
    decoder: Path
    profile: str
    method: str
    sixteen_bit: Dict[str, List[str]]
    symbol_bits: int
    symbols_outside_int8: int
    float_islands: Dict[str, List[str]]


def pad_to(array: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad (1, C, H, W) to multiples of ``multiple``, centred, exactly as ``src.eval`` pads what it codes."""
    left, right, top, bottom = compute_padding(*array.shape[-2:], min_div=multiple)[0]
    return np.pad(array, ((0, 0), (0, 0), (top, bottom), (left, right)))


@dataclass
class Calibration:
    """Histograms of the FP32 encoder's and decoder's tensors on whole calibration images (one profile-free pass)."""
    encoder: Dict[str, TensorHistogram]
    decoder: Dict[str, TensorHistogram]
    symbols: List[np.ndarray]
    images: List[np.ndarray]
    sources: Dict[str, Path]


def calibrate(fp32: Dict[str, Path], images: Sequence[np.ndarray], folder: Path) -> Calibration:
    """Histograms of both halves: the encoder on the images, the decoder on the FP32 encoder's symbols of them."""
    enc = session(fp32["encoder"])
    symbols = [run(enc, image) for image in images]
    sources = {"encoder": prepared(fp32["encoder_centred"], folder), "decoder": prepared(fp32["decoder"], folder)}
    return Calibration(activation_histograms(sources["encoder"], images),
                       activation_histograms(sources["decoder"], symbols), symbols, list(images), sources)


def half_plan(calib: Calibration, half: str, profile: str, method: str,
              extra_sixteen_bit: Sequence[str] = ()) -> QuantPlan:
    """What the INT8 ``half`` (encoder or decoder) of ``profile`` is quantised with: a range per activation of its
    calibration histograms, 16 bits where the profile (and ``extra_sixteen_bit``) put them."""
    if profile not in PROFILES:
        raise ValueError(f"precision profile must be one of {sorted(PROFILES)}, got {profile!r}")
    source = calib.sources[half]
    hists = calib.encoder if half == "encoder" else calib.decoder
    symbol_tensor = ENCODER_OUTPUT if half == "encoder" else DECODER_INPUT
    sixteen = ([t for t in stage_outputs(source, "g_a" if half == "encoder" else "g_s") if t != symbol_tensor]
               if profile == "a16w8" else [])
    sixteen += [t for t in extra_sixteen_bit if t in hists and t not in sixteen]
    sixteen = [t for t in carried(source, sixteen) if t in hists]
    return plan(hists, sixteen, symbol_tensor, symbol_bits(calib.symbols)[0], method)


def quantise_half(calib: Calibration, half: str, profile: str, method: str, out: Path,
                  extra_sixteen_bit: Sequence[str] = ()) -> QuantPlan:
    """Write the INT8 ``half`` (encoder or decoder) of ``profile`` to ``out``; returns what it was quantised with."""
    qplan = half_plan(calib, half, profile, method, extra_sixteen_bit)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantise(calib.sources[half], out, qplan, calib.images[0] if half == "encoder" else calib.symbols[0])
    return qplan


def quantise_pair(calib: Calibration, profile: str, method: str, folder: Path) -> Int8Pair:
    """INT8 encoder and decoder of ``profile`` (``PROFILES``) with ``method`` ranges, written into ``folder``."""
    paths = {half: folder / f"{half}.int8.onnx" for half in ("encoder", "decoder")}
    plans = {half: quantise_half(calib, half, profile, method, path) for half, path in paths.items()}
    bits, outside = symbol_bits(calib.symbols)
    return Int8Pair(paths["encoder"], paths["decoder"], profile, method,
                    {half: q.sixteen_bit for half, q in plans.items()}, bits, outside,
                    {half: float_islands(path) for half, path in paths.items()})


# ---------------------------------------------------------------- the codec around the graphs, and its round trip


class SymbolCodec:
    """Symbol-interface ONNX graphs around the model's range coder, with CompressAI's ``compress``/``decompress``.

    The encoder graph hands over the symbols themselves; they are coded with
    the entropy bottleneck's tables as they are (no medians, no rounding on the
    host), and the decoder graph receives them as decoded. So
    ``src.codec.roundtrip.bitstream_roundtrip`` measures real bits through these graphs.
    """

    def __init__(self, encoder: Path, decoder: Path, entropy_bottleneck: nn.Module):
        self.encoder, self.decoder, self.entropy_bottleneck = session(encoder), session(decoder), entropy_bottleneck

    def symbols(self, x: np.ndarray) -> np.ndarray:
        return run(self.encoder, x)

    def compress(self, x: torch.Tensor) -> Dict:
        symbols = torch.from_numpy(self.symbols(x.numpy()))
        eb = self.entropy_bottleneck
        strings = EntropyModel.compress(eb, symbols, eb._build_indexes(symbols.size()))
        return {"strings": [strings], "shape": symbols.shape[-2:], "symbols": symbols}

    def decompress(self, strings: List[List[bytes]], shape) -> Dict[str, torch.Tensor]:
        eb = self.entropy_bottleneck
        size = (len(strings[0]), eb.channels if hasattr(eb, "channels") else eb.quantiles.shape[0], *shape)
        symbols = EntropyModel.decompress(eb, strings[0], eb._build_indexes(size), torch.float32)
        return {"x_hat": torch.from_numpy(run(self.decoder, symbols.numpy())).clamp_(0, 1)}


def mean_points(codec: Any, images: Sequence[torch.Tensor], multiple: int) -> Tuple[Dict[str, float], List[Dict]]:
    """(mean, per image) PSNR / MS-SSIM on 8-bit levels and real bpp of ``src.codec.roundtrip.bitstream_roundtrip``.

    ``codec`` has a CompressAI model's ``compress`` / ``decompress``; each image
    is padded to ``multiple`` for coding and measured on its own area.
    """
    rows = []
    for image in images:
        coded = bitstream_roundtrip(codec, image, multiple)
        metrics = quantised_metrics(image, coded["x_hat"])
        rows.append({"psnr": metrics["psnr"], "ms_ssim": metrics["ms_ssim"],
                     "bpp": coded["bits"] / (image.shape[-2] * image.shape[-1])})
    return {key: float(np.mean([row[key] for row in rows])) for key in ("psnr", "ms_ssim", "bpp")}, rows


def roundtrip_points(codec: SymbolCodec, images: Sequence[torch.Tensor]) -> Dict:
    """``mean_points`` through the symbol graphs, with each image's symbols (for comparing two encoders)."""
    mean, rows = mean_points(codec, images, 64)
    symbols = [codec.symbols(pad_to(image.numpy(), 64)) for image in images]
    return {**mean, "per_image": rows, "symbols": symbols}


def sensitivity(calib: Calibration, pair: Int8Pair, entropy_bottleneck: nn.Module, images: Sequence[torch.Tensor],
                folder: Path) -> List[Dict]:
    """What 16 bits buy, tensor by tensor: the round trip with one activation of ``pair`` at 16 bits, against
    ``pair`` itself (PSNR gain in dB, rate change), most valuable first. A user reads it to choose which
    tensors go to 16 bits on an NPU that allows mixed precision."""
    base = roundtrip_points(SymbolCodec(pair.encoder, pair.decoder, entropy_bottleneck), images)
    rows = []
    for half, hists in (("encoder", calib.encoder), ("decoder", calib.decoder)):
        kept = set(pair.sixteen_bit[half]) | {ENCODER_OUTPUT if half == "encoder" else DECODER_INPUT}
        source = onnx.load(str(calib.sources[half])).graph
        kept |= {n.output[0] for n in source.node if n.op_type == "Reshape"}  # tried with their input (carried)
        for name in sorted(set(hists) - kept):
            trial = folder / f"{half}.trial.onnx"
            quantise_half(calib, half, pair.profile, pair.method, trial, extra_sixteen_bit=[name])
            encoder, decoder = (trial, pair.decoder) if half == "encoder" else (pair.encoder, trial)
            point = roundtrip_points(SymbolCodec(encoder, decoder, entropy_bottleneck), images)
            rows.append({"half": half, "tensor": name, "psnr_gain": point["psnr"] - base["psnr"],
                         "rate_change": point["bpp"] / base["bpp"] - 1})
    return sorted(rows, key=lambda r: r["psnr_gain"], reverse=True)


def sensitivity_markdown(rows: Sequence[Dict], top: int = 15) -> str:
    lines = ["| half | tensor at 16 bits | PSNR gain | rate change |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['half']} | `{r['tensor']}` | {r['psnr_gain']:+.4f} dB | {100 * r['rate_change']:+.3f} % |"
              for r in rows[:top]]
    return "\n".join(lines)
