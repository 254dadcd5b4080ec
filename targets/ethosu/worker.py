"""The Arm Ethos-U worker: float ONNX -> full-integer TFLite -> Vela, and the integer model run on the eval arrays.

    .venv-ethosu/bin/python targets/ethosu/worker.py JOB.json

Runs inside ``.venv-ethosu`` (``targets/ethosu/requirements.txt``) and imports only its toolchain, numpy and the
standard library, never the project (protocol: ``docs/npu_targets.md``). For each part of the job:

1. ``onnx2tf`` turns the float ONNX graph, at a static input shape, into a TensorFlow SavedModel (NHWC), which
   must compute what onnxruntime computes from the ONNX graph on the first calibration array (``check_float``);
2. TensorFlow Lite's converter quantises it to full integer on the job's calibration arrays: ``w8a8`` is int8
   activations and weights (``TFLITE_BUILTINS_INT8``), ``a16w8`` is TFLite's 16x8 mode (int16 activations, int8
   weights), with integer inputs and outputs so no float op is left at either end;
3. the interface is set as the project's codec has it (``set_interface``): the symbols (the encoder's output, the
   decoder's input) at scale 1, zero point 0, so the encoder's requantisation *is* the codec's rounding and the NPU
   emits the entropy coder's integers; in w8a8 the image (encoder input, decoder output) at scale 1/255, zero point
   -128, i.e. exactly the 8-bit levels. Biases of the convolutions that read a re-scaled tensor are requantised;
4. ``vela`` compiles that int8 model for the target; its own report says which operators run on the NPU, why each
   other one falls back to the CPU, and its performance estimates (``vela_report``);
5. the int8 model (Vela keeps its numerics) runs in the LiteRT interpreter on every eval array; outputs are
   dequantised to float32 NCHW.

A toolchain error is one line on stderr and exit 2; out_dir is written whole or not at all (temp folder, rename).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ log lines would bury the worker's one line
TOOLCHAIN = "ethos-u-vela"
WORKER_VERSION = "ethosu-worker-3"  # part of the int8 cache key: bump when the conversion changes
# Vela's accelerator and the system / memory configuration of its shipped Arm/vela.ini that each target is
# compiled for (Arm's reference systems for each NPU; the estimates hold for these clocks and memories).
TARGETS = {
    "ethos-u55-256": ("ethos-u55-256", "Ethos_U55_High_End_Embedded", "Shared_Sram"),
    "ethos-u65-256": ("ethos-u65-256", "Ethos_U65_High_End", "Dedicated_Sram"),
    "ethos-u85-256": ("ethos-u85-256", "Ethos_U85_SYS_DRAM_High", "Dedicated_Sram"),
}
PRECISIONS = ("w8a8", "a16w8")
DEFAULT_RANGE_METHOD = "mse"  # the project's default (src.quant.scheme.DEFAULT_RANGE_METHOD)
RANGE_CHOICE = Path(__file__).resolve().parents[2] / "src" / "quant" / "range_choice.py"
SYMBOLS, IMAGE_IN, IMAGE_OUT = "symbols", "x", "x_hat"
CONV_OPS = {"CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "FULLY_CONNECTED": 2, "TRANSPOSE_CONV": 3}  # op -> bias input
# Ops whose output must carry its input's quantisation (TFLite requires it): a re-scaled tensor passes through them.
SAME_QUANT_OPS = {"PAD", "PADV2", "RESHAPE", "TRANSPOSE", "STRIDED_SLICE", "SLICE", "SQUEEZE", "EXPAND_DIMS",
                  "DEPTH_TO_SPACE", "SPACE_TO_DEPTH"}


class WorkerError(Exception):
    """A failure the user reads as one line (the toolchain's own words where it has some)."""


# ---------------------------------------------------------------- job and arrays

def read_job(path: Path) -> Dict:
    try:
        job = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise WorkerError(f"cannot read job {path}: {err}") from None
    if job.get("target") not in TARGETS:
        raise WorkerError(f"unknown target {job.get('target')!r}: this worker compiles for {sorted(TARGETS)}")
    if job.get("precision") not in PRECISIONS:
        raise WorkerError(f"unknown precision {job.get('precision')!r}: one of {PRECISIONS}")
    methods = range_choice().RANGE_METHODS
    if job.setdefault("range_method", DEFAULT_RANGE_METHOD) not in methods:
        raise WorkerError(f"unknown range_method {job['range_method']!r}: one of {methods}")
    return job


def load_arrays(path: str) -> List[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arr_{i}"].astype(np.float32) for i in range(len(data.files))]


def fit(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``array`` (1, C, H, W) centred in ``shape``: zero-padded where smaller (as the codec pads), cropped where larger."""
    out = array
    for axis in (2, 3):
        size, want = out.shape[axis], shape[axis]
        if size > want:
            start = (size - want) // 2
            out = np.take(out, range(start, start + want), axis=axis)
        elif size < want:
            pad = [(0, 0)] * 4
            pad[axis] = ((want - size) // 2, want - size - (want - size) // 2)
            out = np.pad(out, pad)
    return out


def nhwc(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------- ONNX -> integer TFLite

@contextlib.contextmanager
def quiet():
    """TensorFlow and onnx2tf print pages; the worker's stdout is its own. Kept for the error line on failure."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            yield buffer
        except Exception as err:
            raise WorkerError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                              f" (last output: {last_line(buffer.getvalue())})") from err


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "none"


ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def static_onnx(onnx_path: str, input_name: str, shape: Sequence[int], out: Path) -> Path:
    """``onnx_path`` with its dynamic H/W fixed to ``shape`` and shapes inferred again.

    onnx2tf's ``overwrite_input_shape`` leaves H and W dynamic in the Keras model it builds, and Vela places only
    tensors whose non-batch dimensions are static; a graph that is static from its input on converts static.
    """
    import onnx
    model = onnx.load(onnx_path)
    inputs = [i for i in model.graph.input if i.name == input_name]
    if not inputs:
        raise WorkerError(f"{onnx_path} has no input {input_name!r}")
    for dim, value in zip(inputs[0].type.tensor_type.shape.dim, shape):
        dim.Clear()
        dim.dim_value = int(value)
    del model.graph.value_info[:]
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    onnx.save(onnx.shape_inference.infer_shapes(model), str(out))
    return out


def onnx2tf_sample(calibration: Sequence[np.ndarray], folder: Path) -> None:
    """The sample file onnx2tf reads from its working folder for an image input (else it downloads one): 20
    of the job's own calibration images, 128 x 128, NHWC."""
    if calibration[0].shape[1] != 3:
        return
    images = [nhwc(fit(a, (1, 3, 128, 128)))[0] for a in calibration]
    np.save(folder / ONNX2TF_SAMPLE, np.stack([images[i % len(images)] for i in range(20)]).astype(np.float32))


def saved_model(onnx_path: str, input_name: str, shape: Sequence[int], calibration: Sequence[np.ndarray],
                folder: Path) -> Path:
    """onnx2tf's SavedModel of ``onnx_path`` at the static input ``shape`` (NCHW in ONNX, NHWC in TF), converted
    in ``folder`` as its working directory with the sample file it would otherwise download there."""
    import onnx2tf
    out = folder / "saved_model"
    static = static_onnx(onnx_path, input_name, shape, folder / "static.onnx")
    onnx2tf_sample(calibration, folder)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with quiet():
            onnx2tf.convert(input_onnx_file_path=str(static), output_folder_path=str(out),
                            output_signaturedefs=True, non_verbose=True)
    finally:
        os.chdir(cwd)
    check_float(static, input_name, out, calibration[0])
    return out


# Share of output elements that may differ by more than FLOAT_TOLERANCE x the output's peak: a converter that
# mislays a tensor changes most of them; an encoder's rounding may flip a few symbols on float noise.
FLOAT_MISMATCH_SHARE, FLOAT_TOLERANCE = 0.01, 0.01


def check_float(static: Path, input_name: str, model_dir: Path, array: np.ndarray) -> None:
    """The SavedModel against onnxruntime on the ONNX graph it came from, before anything is quantised.

    onnx2tf guesses layouts from shapes and can guess wrong without an error (its Add "rescue guard" mislaid a
    decoder's residual sum whose channel count equalled the feature map's height: src.targets.rewrites); an int8
    model of a wrong float model would then be measured and reported as the target's numbers.
    """
    import onnxruntime
    import tensorflow as tf
    session = onnxruntime.InferenceSession(str(static), providers=["CPUExecutionProvider"])
    reference = session.run(None, {input_name: array.astype(np.float32)})[0]
    function = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    argument = list(function.structured_input_signature[1])[0]
    output = list(function(**{argument: tf.constant(nhwc(array))}).values())[0].numpy()
    if output.ndim == 4:
        output = output.transpose(0, 3, 1, 2)
    if output.shape != reference.shape:
        raise WorkerError(f"onnx2tf's float model gives shape {list(output.shape)} where the ONNX graph gives "
                          f"{list(reference.shape)} (a converter layout error)")
    peak = float(np.abs(reference).max()) or 1.0
    difference = np.abs(output - reference)
    off = difference > FLOAT_TOLERANCE * peak
    if off.mean() > FLOAT_MISMATCH_SHARE:
        raise WorkerError(f"onnx2tf's float model differs from the ONNX graph in {off.mean():.1%} of the outputs "
                          f"(max |diff| {float(difference.max()):.3g}, peak {peak:.3g}): a converter "
                          f"layout error, nothing quantised")


def converter(model_dir: Path, calibration: Sequence[np.ndarray], precision: str):
    """TFLite's full-integer converter of the SavedModel, calibrating on ``calibration`` (NCHW arrays)."""
    import tensorflow as tf

    def representative():
        for array in calibration:
            yield [nhwc(array)]

    conv = tf.lite.TFLiteConverter.from_saved_model(str(model_dir))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    if precision == "w8a8":
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = conv.inference_output_type = tf.int8
    else:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        conv.inference_input_type = conv.inference_output_type = tf.int16
    return conv


def integer_tflite(model_dir: Path, calibration: Sequence[np.ndarray], precision: str, range_method: str
                   ) -> Tuple[bytes, int]:
    """Full-integer TFLite of the SavedModel and how many activation ranges the project chose.

    ``minmax`` is TFLite's own calibration as it stands. Any other method is the project's (``range_choice``): the
    converter only calibrates (its float model then carries each activation's min/max), every activation inside
    the graph gets the range the project's ONNX INT8 would give it (``project_ranges``), and TFLite's own quantiser
    quantises from those ranges: the MLIR quantiser for int8, the 16x8 one for int16, as ``convert()`` would call
    them. The quantisers then apply their own constraints (same scale through reshapes, fixed output scales).
    """
    import tensorflow as tf
    conv = converter(model_dir, calibration, precision)
    if range_method == "minmax":
        with quiet():
            return conv.convert(), 0
    conv._experimental_calibrate_only = True
    # Float ends while calibrating: convert() would otherwise try to retype the (still float) model's 16-bit ends.
    conv.inference_input_type = conv.inference_output_type = tf.float32
    with quiet():
        calibrated = conv.convert()
    ranged, chosen = project_ranges(calibrated, calibration, 8 if precision == "w8a8" else 16, range_method)
    with quiet():
        return quantise_calibrated(ranged, precision), chosen


def quantise_calibrated(calibrated: bytes, precision: str) -> bytes:
    """TFLite's quantiser on a calibrated float model (what ``TFLiteConverter._quantize`` does after calibrating)."""
    import tensorflow as tf
    if precision == "w8a8":
        from tensorflow.lite.python import convert
        return convert.mlir_quantize(calibrated, input_data_type=tf.int8, output_data_type=tf.int8)
    from tensorflow.lite.python.optimize import calibrator
    int16, int64 = np.dtype(np.int16).num, np.dtype(np.int64).num
    # No tensor fed: the quantiser reads the ranges already in the model (feeding would overwrite them).
    return calibrator.Calibrator(calibrated)._calibrator.QuantizeModel(int16, int16, False, int16, int64, False, False)


def range_choice():
    """The project's ``src/quant/range_choice.py`` (numpy only), loaded by path: the one module of the project
    the worker runs, so that a TFLite tensor's range is chosen by the very code that chooses the ONNX INT8's."""
    name = "project_range_choice"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RANGE_CHOICE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def project_ranges(calibrated: bytes, calibration: Sequence[np.ndarray], bits: int, method: str) -> Tuple[bytes, int]:
    """``calibrated`` with each inner activation's min/max replaced by the project's range for ``method``.

    Histograms are taken as ``src.quant.ranges`` takes them (``HISTOGRAM_BINS`` bins between the tensor's min and
    max over the calibration arrays, which TFLite's calibration recorded) from the float model run in LiteRT with
    every tensor kept, one array at a time. The graph's input and output keep theirs: the codec's interface sets
    them (``set_interface``).
    """
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils
    rc = range_choice()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    graph = model.subgraphs[0]
    ends = set(graph.inputs) | set(graph.outputs)
    hists = {}
    for index, tensor in enumerate(graph.tensors):
        q = tensor.quantization
        if index not in ends and q is not None and q.min is not None and len(q.min) == 1:
            low, high = float(q.min[0]), float(q.max[0])
            hists[index] = rc.TensorHistogram(low, high if high > low else low + 1e-6,
                                              np.zeros(rc.HISTOGRAM_BINS, dtype=np.int64))
    # Every intermediate tensor is kept and readable with the default (XNNPACK) delegate too: checked on a small
    # conv / depthwise / residual graph against BUILTIN_WITHOUT_DEFAULT_DELEGATES, equal to within 1.5e-7.
    with quiet():
        interpreter = Interpreter(model_content=bytes(calibrated), experimental_preserve_all_tensors=True,
                                  num_threads=os.cpu_count())
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]["index"]
    for array in calibration:
        interpreter.set_tensor(source, nhwc(array))
        interpreter.invoke()
        for index, hist in hists.items():
            values = interpreter.get_tensor(index)
            hist.counts += np.histogram(values, bins=len(hist.counts), range=(hist.low, hist.high))[0]
    for index, hist in hists.items():
        low, high = rc.choose_range(hist, bits, method)
        graph.tensors[index].quantization.min, graph.tensors[index].quantization.max = [low], [high]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), len(hists)


# ---------------------------------------------------------------- the codec's interface in the flatbuffer

def op_names(model) -> List[str]:
    """Builtin operator name of each operator code of the model."""
    from tensorflow.lite.python import schema_py_generated as schema
    by_code = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return [by_code[max(code.builtinCode, code.deprecatedBuiltinCode)] for code in model.operatorCodes]


def interface_quantisation(name: str, precision: str) -> Tuple[float, int] | None:
    """(scale, zero point) the codec's interface tensor ``name`` has, or None to keep the calibrated one."""
    if name == SYMBOLS:
        return 1.0, 0
    if name in (IMAGE_IN, IMAGE_OUT) and precision == "w8a8":
        return 1.0 / 255.0, -128
    return None


def requantise_bias(model, op, scale_ratio: float) -> None:
    """Bias of conv-like ``op`` after its input's scale was multiplied by 1/``scale_ratio`` (old / new)."""
    graph = model.subgraphs[0]
    names = op_names(model)
    bias_index = op.inputs[CONV_OPS[names[op.opcodeIndex]]] if len(op.inputs) > CONV_OPS[names[op.opcodeIndex]] else -1
    if bias_index < 0:
        return
    bias = graph.tensors[bias_index]
    buffer = model.buffers[bias.buffer]
    dtype = np.int64 if bias.type == 4 else np.int32  # TensorType INT64 = 4
    values = np.frombuffer(bytes(buffer.data), dtype=dtype).astype(np.float64)
    limits = np.iinfo(dtype)
    buffer.data = np.clip(np.round(values * scale_ratio), limits.min, limits.max).astype(dtype).tobytes()
    bias.quantization.scale = [float(s) / scale_ratio for s in bias.quantization.scale]


def set_quantisation(model, tensor_index: int, scale: float, zero_point: int, downstream: bool) -> List[str]:
    """Give tensor ``tensor_index`` (an input when ``downstream``, else an output) ``scale`` / ``zero_point``.

    Ops that must keep their input's parameters (``SAME_QUANT_OPS``) pass the change on; a convolution that reads
    the tensor gets its bias requantised. Returns what was changed, for the report.
    """
    graph, names = model.subgraphs[0], op_names(model)
    tensor = graph.tensors[tensor_index]
    old = float(tensor.quantization.scale[0])
    tensor.quantization.scale, tensor.quantization.zeroPoint = [float(scale)], [int(zero_point)]
    changed = [tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)]
    for op in graph.operators:
        kind = names[op.opcodeIndex]
        if downstream and tensor_index in list(op.inputs)[:1]:
            if kind in CONV_OPS:
                requantise_bias(model, op, old / scale)
            elif kind in SAME_QUANT_OPS:
                changed += set_quantisation(model, op.outputs[0], scale, zero_point, downstream)
        if not downstream and tensor_index in list(op.outputs) and kind in SAME_QUANT_OPS:
            changed += set_quantisation(model, op.inputs[0], scale, zero_point, downstream)
    return changed


def set_interface(flatbuffer: bytes, input_name: str, output_name: str, precision: str) -> Tuple[bytes, List[str]]:
    """The model with its interface tensors quantised as the codec has them (module docstring, step 3)."""
    from tensorflow.lite.tools import flatbuffer_utils
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    graph = model.subgraphs[0]
    carried = []
    for name, index, downstream in ((input_name, graph.inputs[0], True), (output_name, graph.outputs[0], False)):
        wanted = interface_quantisation(name, precision)
        if wanted is not None:
            set_quantisation(model, index, *wanted, downstream=downstream)
            carried.append(f"{name} at scale {wanted[0]:.6g}, zero point {wanted[1]}")
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), carried


# ---------------------------------------------------------------- running the integer model

def run_tflite(model_path: Path, arrays: Iterable[np.ndarray]) -> List[np.ndarray]:
    """The integer model on each NCHW float array (quantised with the input's parameters); float NCHW outputs."""
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(model_path), num_threads=os.cpu_count())
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    (in_scale, in_zero), (out_scale, out_zero) = inp["quantization"], out["quantization"]
    limits = np.iinfo(inp["dtype"])
    outputs = []
    for array in arrays:
        q = np.clip(np.round(nhwc(array) / in_scale) + in_zero, limits.min, limits.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], q)
        interpreter.invoke()
        y = (interpreter.get_tensor(out["index"]).astype(np.float32) - out_zero) * out_scale
        outputs.append(np.ascontiguousarray(y.transpose(0, 3, 1, 2)).astype(np.float32))
    return outputs


def tflite_ops(model_path: Path) -> List[str]:
    """Builtin op names of the model's operators, in order."""
    from tensorflow.lite.tools import flatbuffer_utils
    model = flatbuffer_utils.read_model(str(model_path))
    names = op_names(model)
    return [names[op.opcodeIndex] for op in model.subgraphs[0].operators]


# ---------------------------------------------------------------- Vela

def vela_config() -> Path:
    """The system configurations shipped with Vela (Arm/vela.ini)."""
    from importlib.util import find_spec
    path = Path(find_spec("ethosu").submodule_search_locations[0]) / "config_files" / "Arm" / "vela.ini"
    if not path.exists():
        raise WorkerError(f"Vela's Arm/vela.ini not found at {path}")
    return path


def run_vela(model_path: Path, target: str, out_dir: Path) -> Tuple[str, Path]:
    """Vela on ``model_path`` for ``target``; (its stdout, its output folder)."""
    accelerator, system, memory = TARGETS[target]
    vela_dir = out_dir / f"vela_{model_path.stem}"
    command = [str(Path(sys.executable).with_name("vela")), str(model_path), "--accelerator-config", accelerator,
               "--config", str(vela_config()), "--system-config", system, "--memory-mode", memory,
               "--output-dir", str(vela_dir), "--verbose-performance"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise WorkerError(f"vela failed on {model_path.name} for {target}: {last_line(done.stderr or done.stdout)}")
    return done.stdout + done.stderr, vela_dir


FALLBACK = re.compile(r"^Warning \(supported operators\) operator: (?P<op>[A-Z0-9_]+), ofm: '(?P<name>.*)'$")


def vela_fallbacks(output: str) -> List[Dict[str, str]]:
    """Each operator Vela placed on the CPU with its reason, as Vela 5 prints them::

        Warning (supported operators) operator: TRANSPOSE_CONV, ofm: 'name'
        Reason: Unsupported IFM/OFM shapes
        <constraint text, one or more lines>
    """
    lines = output.splitlines()
    fallbacks = []
    for i, line in enumerate(lines):
        match = FALLBACK.match(line.strip())
        if not match:
            continue
        detail = []
        for follow in lines[i + 1:]:
            if not follow.strip() or follow.startswith("Warning") or follow.startswith("Network summary"):
                break
            detail.append(follow.strip().removeprefix("Reason: "))
        fallbacks.append({"op": match["op"], "name": match["name"], "reason": " ".join(detail)})
    return fallbacks


def summary_csv(vela_dir: Path) -> Dict[str, str]:
    files = sorted(vela_dir.glob("*_summary_*.csv"))
    if not files:
        raise WorkerError(f"vela wrote no summary CSV in {vela_dir}")
    with files[0].open() as handle:
        return next(csv.DictReader(handle))


def operator_counts(output: str) -> Tuple[int, int]:
    """(CPU operators, NPU operators) as Vela's network summary prints them."""
    cpu = re.search(r"CPU operators = (\d+)", output)
    npu = re.search(r"NPU operators = (\d+)", output)
    if not cpu or not npu:
        raise WorkerError("vela's summary has no 'CPU operators' / 'NPU operators' lines")
    return int(cpu[1]), int(npu[1])


def estimates(summary: Dict[str, str]) -> Dict[str, float]:
    """Vela's performance estimates from its summary CSV (the keys it writes, converted to numbers)."""
    wanted = {"inference_time": "latency_s", "inferences_per_second": "inferences_per_second",
              "nn_macs": "macs", "sram_memory_used": "sram_kib", "off_chip_flash_memory_used": "off_chip_flash_kib",
              "dram_memory_used": "dram_kib", "on_chip_flash_memory_used": "on_chip_flash_kib",
              "cycles_total": "cycles", "core_clock": "core_clock_hz"}
    out = {}
    for key, name in wanted.items():
        if summary.get(key) not in (None, ""):
            out[name] = float(summary[key])
    if "latency_s" in out:
        out["latency_ms"] = out["latency_s"] * 1000.0
    return out


def vela_report(int8_path: Path, target: str, out_dir: Path, part: str) -> Dict:
    output, vela_dir = run_vela(int8_path, target, out_dir)
    compiled = next(vela_dir.glob("*_vela.tflite"), None)
    if compiled is None:
        raise WorkerError(f"vela wrote no compiled model for {int8_path.name}")
    shutil.move(str(compiled), out_dir / f"{part}_vela.tflite")
    (out_dir / f"{part}_vela.log").write_text(output)
    cpu, npu = operator_counts(output)
    summary = summary_csv(vela_dir)
    shutil.move(str(next(vela_dir.glob("*_summary_*.csv"))), out_dir / f"{part}_vela_summary.csv")
    shutil.rmtree(vela_dir)
    return {"artefact": f"{part}_vela.tflite", "ops_total": cpu + npu, "ops_npu": npu,
            "fallbacks": vela_fallbacks(output), "estimates": estimates(summary),
            "system_config": list(TARGETS[target][1:])}


# ---------------------------------------------------------------- one part, one job

def quantised_model(spec: Dict, shape: Tuple[int, ...], calibration: Sequence[np.ndarray], precision: str,
                    range_method: str, work: Path) -> Tuple[bytes, List[str]]:
    folder = Path(tempfile.mkdtemp(dir=work))
    fitted = [fit(a, shape) for a in calibration]
    model_dir = saved_model(spec["onnx"], spec.get("input", "x"), shape, fitted, folder)
    flatbuffer, chosen = integer_tflite(model_dir, fitted, precision, range_method)
    shutil.rmtree(folder)
    flatbuffer, carried = set_interface(flatbuffer, spec.get("input", "x"), spec.get("output", "y"), precision)
    return flatbuffer, carried + [ranges_note(range_method, chosen)]


def ranges_note(range_method: str, chosen: int) -> str:
    if range_method == "minmax":
        return ("activation ranges: TFLite's own calibration (min/max) on the job's whole calibration arrays, each "
                "fitted to the compiled shape")
    return (f"activation ranges: the project's '{range_method}' ranges (src/quant/range_choice.py) for {chosen} "
            f"inner activations, from their histograms on the job's whole calibration arrays (each fitted to the "
            f"compiled shape), quantised by TFLite's own quantiser")


def digest(*parts) -> str:
    """A cache key over files (by content), arrays (by values) and plain values, and the toolchain's versions."""
    h = hashlib.sha256(json.dumps([WORKER_VERSION, toolchain_versions()]).encode())
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        elif isinstance(part, np.ndarray):
            h.update(str(part.shape).encode() + np.ascontiguousarray(part, np.float32).tobytes())
        else:
            h.update(json.dumps(part).encode())
    return h.hexdigest()[:24]


def cached_model(spec: Dict, shape: Tuple[int, ...], calibration: Sequence[np.ndarray], precision: str,
                 range_method: str, work: Path, cache: Path | None) -> Tuple[bytes, List[str], bool]:
    """``quantised_model``, reused from ``cache`` when the same ONNX, calibration, shape and precision made one.

    The int8 model does not depend on the Ethos-U variant (only Vela's compile does), so U55, U65 and U85 jobs
    of one model share it, and its LiteRT outputs (``cached_outputs``).
    """
    if cache is None:
        return (*quantised_model(spec, shape, calibration, precision, range_method, work), False)
    key = digest(Path(spec["onnx"]), RANGE_CHOICE, *calibration, list(shape), precision, range_method,
                 spec.get("input"), spec.get("output"))
    model, notes = cache / f"{key}.tflite", cache / f"{key}.json"
    if model.is_file() and notes.is_file():
        return model.read_bytes(), json.loads(notes.read_text()), True
    flatbuffer, carried = quantised_model(spec, shape, calibration, precision, range_method, work)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(model, flatbuffer)
    atomic_write(notes, json.dumps(carried).encode())
    return flatbuffer, carried, False


def atomic_write(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def cached_outputs(model_path: Path, array: np.ndarray, cache: Path | None) -> np.ndarray:
    if cache is None:
        return run_tflite(model_path, [array])[0]
    h = hashlib.sha256(model_path.read_bytes())
    h.update(np.ascontiguousarray(array, np.float32).tobytes())
    path = cache / f"out_{h.hexdigest()[:24]}.npy"
    if path.is_file():
        return np.load(path)
    out = run_tflite(model_path, [array])[0]
    cache.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, out)
    atomic_write(path, buffer.getvalue())
    return out


def compile_part(part: str, spec: Dict, target: str, precision: str, range_method: str, out_dir: Path,
                 cache: Path | None) -> Dict:
    calibration = load_arrays(spec["calibration"])
    if not calibration:
        raise WorkerError(f"{part}: no calibration arrays in {spec['calibration']}")
    evals = load_arrays(spec["eval"]) if spec.get("eval") else []
    shape = tuple(int(d) for d in spec.get("compile_shape") or calibration[0].shape)
    models: Dict[Tuple[int, ...], Path] = {}
    carried: List[str] = []
    reused = []
    for wanted in dict.fromkeys([shape] + [tuple(a.shape) for a in evals]):
        flatbuffer, carried, hit = cached_model(spec, wanted, calibration, precision, range_method, out_dir, cache)
        name = f"{part}_int8.tflite" if wanted == shape else f"{part}_int8_{'x'.join(map(str, wanted))}.tflite"
        models[wanted] = out_dir / name
        models[wanted].write_bytes(flatbuffer)
        if hit:
            reused.append(name)
    report = vela_report(models[shape], target, out_dir, part)
    report["int8_model"] = models[shape].name
    report["int8_models_reused_from_cache"] = reused
    report["tflite_ops"] = tflite_ops(models[shape])
    report["input_shape"] = list(shape)
    if evals:
        outputs = [cached_outputs(models[tuple(a.shape)], a, cache) for a in evals]
        np.savez(out_dir / f"{part}_outputs.npz", *outputs)
        report["eval_models"] = {"x".join(map(str, s)): p.name for s, p in models.items()}
    report["quantisation"] = {
        "carried": carried,
        "lost": ("a QAT checkpoint's trained scales: onnx2tf's tensors carry no ONNX names to map them onto, so "
                 "its float weights are calibrated as above"
                 + ("; the 16-bit plan: TFLite's 16x8 gives every activation 16 bits, not the plan's main path only"
                    if precision == "a16w8" else ""))}
    return report


def toolchain_versions() -> Dict[str, str]:
    return {name: metadata.version(name) for name in ("ethos-u-vela", "onnx2tf", "tensorflow", "ai-edge-litert")}


def run_job(job: Dict) -> Path:
    out_dir = Path(job["out_dir"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        versions = toolchain_versions()
        report = {"target": job["target"], "precision": job["precision"], "range_method": job["range_method"],
                  "toolchain": {"name": TOOLCHAIN, "version": versions["ethos-u-vela"], "versions": versions},
                  "parts": {part: named(part, compile_part, part, spec, job["target"], job["precision"],
                                        job["range_method"], temp,
                                        Path(job["cache_dir"]) if job.get("cache_dir") else None)
                            for part, spec in job["parts"].items()}}
        (temp / "report.json").write_text(json.dumps(report, indent=2))
        replace_folder(temp, out_dir)
    finally:
        if not os.environ.get("ETHOSU_WORKER_KEEP"):  # debugging: keep the half-built folder
            shutil.rmtree(temp, ignore_errors=True)
    return out_dir


def named(part: str, function, *args):
    """``function(*args)``, its one-line error naming the part (encoder / decoder) it was compiling."""
    try:
        return function(*args)
    except WorkerError as err:
        raise WorkerError(f"{part}: {err}") from err


def replace_folder(built: Path, target: Path) -> None:
    """Put ``built`` at ``target``; an earlier ``target`` is removed only once the new one is in place."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    built.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: worker.py JOB.json", file=sys.stderr)
        return 2
    try:
        out = run_job(read_job(Path(argv[0])))
    except WorkerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a toolchain's own exception: one line, the trace kept for whoever debugs it
        trace = Path(tempfile.gettempdir()) / f"ethosu_worker_{os.getpid()}.trace"
        trace.write_text(traceback.format_exc())
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (trace: {trace})",
              file=sys.stderr)
        return 2
    print(f"ethos-u: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
