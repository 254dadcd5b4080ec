"""RK3588 worker: the codec's symbol graphs through Rockchip's RKNN-Toolkit2 (ONNX in, ``.rknn`` out, simulator run).

Runs inside ``.venv-rknn`` (see ``targets/rknn/requirements.txt``), never the project's ``.venv``:

    python3.11 -m venv .venv-rknn                      (or: ./run.sh npu-setup rknn)
    .venv-rknn/bin/python -m pip install -r targets/rknn/requirements.txt
    .venv-rknn/bin/python -m pip install --no-deps -r targets/rknn/requirements-nodeps.txt
    .venv-rknn/bin/python targets/rknn/worker.py JOB.json

It imports only the toolkit, numpy, the toolkit's own onnx and onnxruntime, and the standard library (the job
format and report are in docs/npu_targets_rknn.md). Per part it

1. makes the graph static at the part's ``compile_shape`` (the protocol's optional key; else calibration arr_0's
   shape), and once more per other eval shape (``<part>_<H>x<W>.rknn``; calibration arrays of another shape are
   centre-cropped or zero-padded to it). The toolkit's own constant folding fails on the exported dynamic-H/W
   graphs, so onnxruntime's basic level folds them first; each ConvTranspose's ``output_padding`` is written as
   an asymmetric end pad (the same function: the toolkit's ConvTranspose channel tiling drops
   ``output_padding`` and then fails on the shapes);
2. quantises with the toolkit's hybrid-quantisation route (``hybrid_quantization_step1`` -> edit its
   ``.quantization.cfg`` -> ``hybrid_quantization_step2``): that file is the only place the toolkit takes a
   tensor's range from outside. The symbol interface is carried there (the encoder's output and the decoder's
   input on [-128, 127], i.e. scale 1, zero point 0) and so are the job's ``tensor_ranges``; the toolkit refuses
   edits of a scale or zero point (``...['scale'] is not allowed to be modified``), so ranges are written as min/max.
   The tensors the toolkit adds itself (the channel Split and per-tile partial sums of the convolutions it cuts to
   fit its filter bank) get ranges too (``toolkit_tensor_ranges``): left to its own min/max they rounded the
   encoder's activations again in front of three convolutions;
3. reads the toolkit's own "Network Layer Information Table" (printed by the compiler at build time) for the
   operators, where each runs (NPU or CPU) and its cycle and memory estimates;
4. exports ``<part>.rknn`` and runs it on the toolkit's simulator (``init_runtime()`` with no target) on every
   eval array, writing ``<part>_outputs.npz`` (float32, dequantised by the toolkit).

Precisions: ``w8a8`` is the toolkit's ``w8a8``; ``a16w8`` has no exact counterpart on RK3588 (the toolkit refuses
``w8a16`` there), so it is the toolkit's ``w16a16i_dfp``: 16-bit activations *and* weights, dynamic fixed point.

A toolchain error is one line on stderr and exit 2; everything is written into a temporary folder first and only
moved into ``out_dir`` when every part compiled, so a failed run replaces nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

TARGETS = ("rk3588",)
PRECISIONS = {"w8a8": "w8a8", "a16w8": "w16a16i_dfp"}
PART_KEYS = ("onnx", "input", "output", "calibration")  # and "eval" (optional: without it, compile only)
TOOLKIT = "rknn-toolkit2"
SYMBOL_RANGE = {8: (-128.0, 127.0), 16: (-32768.0, 32767.0)}
# The compiler's per-layer table: ID OpType DataType Target InputShape OutputShape Cycles(DDR/NPU/Total) RW(KB) FullName
LAYER_ROW = re.compile(r"^D RKNN: \[[\d:.]+\]\s+(\d+)\s+(\S+)\s+(\S+)\s+(NPU|CPU|GPU)\s+(\S+)\s+(\S+)\s+"
                       r"(\d+)/(\d+)/(\d+)\s+(\d+)\s+(\S+)")
MEMORY_ROW = re.compile(r"Total (Internal|Weight) Memory Size: ([\d.]+)KB")
PSEUDO_OPS = ("InputOperator", "OutputOperator")
# Tensors the toolkit's own graph passes add (rknn-toolkit2 2.5.0 names): a channel Split's outputs, and the partial
# sum of each tile of a (transposed) convolution its ``tiling_(de)conv_channelin`` pass cut along the input channels
# (``..._tile<k>_conv``), with the running sum of tiles 0..k+1 where it adds more than two (``..._tile<k>_conv_add``).
SPLIT_OUTPUT = re.compile(r"^(?P<source>.+)_split(?:_o\d+)?$")
TILE_PARTIAL = re.compile(r"^(?P<conv>.+)_tile(?P<index>\d+)_(?:conv|convtranspose)(?P<running>_add)?$")
TILE_MATCH = 1e-3  # a rebuilt partial's min/max against the toolkit's own, relative to its range
RANGE_CHOICE = Path(__file__).resolve().parents[2] / "src" / "quant" / "range_choice.py"
DEFAULT_RANGE_METHOD = "mse"  # the project's default (src.quant.scheme.DEFAULT_RANGE_METHOD)


class ToolchainError(Exception):
    """A step the toolkit (or the job) refused; its message is the one line the worker prints."""


# ---------------------------------------------------------------- the job

def read_job(path: Path) -> dict:
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ToolchainError(f"cannot read job file {path}: {err}") from None
    if job.get("target") not in TARGETS:
        raise ToolchainError(f"target must be one of {TARGETS}, got {job.get('target')!r}")
    if job.get("precision") not in PRECISIONS:
        raise ToolchainError(f"precision must be one of {sorted(PRECISIONS)}, got {job.get('precision')!r}")
    if not job.get("parts") or not job.get("out_dir"):
        raise ToolchainError("job needs 'parts' and 'out_dir'")
    methods = range_choice().RANGE_METHODS
    if job.setdefault("range_method", DEFAULT_RANGE_METHOD) not in methods:
        raise ToolchainError(f"range_method must be one of {methods}, got {job['range_method']!r}")
    for name, part in job["parts"].items():
        missing = [key for key in PART_KEYS if key not in part]
        if missing:
            raise ToolchainError(f"part {name!r} lacks {', '.join(missing)}")
        for key in ("onnx", "calibration", "eval"):
            if key in part and part[key] is not None and not Path(part[key]).is_file():
                raise ToolchainError(f"part {name!r}: {key} file {part[key]} does not exist")
    return job


def arrays(path: str) -> list:
    """The arrays arr_0..arr_N-1 of an npz, in order."""
    with np.load(path) as data:
        return [data[f"arr_{i}"].astype(np.float32) for i in range(len(data.files))]


# ---------------------------------------------------------------- the graph the toolkit gets

def static_graph(src: str, input_name: str, shape: tuple, out: Path) -> Path:
    """``src`` with its input fixed to ``shape``, constants folded, ConvTranspose padding made explicit, and every
    tensor's shape recorded (the toolkit infers shapes itself and fails where the exporter left symbols)."""
    model = onnx.load(src)
    graph_input = next((i for i in model.graph.input if i.name == input_name), None)
    if graph_input is None:
        raise ToolchainError(f"{src} has no input named {input_name!r}")
    for dim, size in zip(graph_input.type.tensor_type.shape.dim, shape):
        dim.ClearField("dim_param")
        dim.dim_value = int(size)
    del model.graph.value_info[:]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(out))
        for node in model.graph.node:
            if node.op_type == "ConvTranspose":
                output_padding_as_end_pad(node)
        record_shapes(model, input_name, shape)
    except Exception as err:  # onnxruntime's own message says which node refuses the shape
        raise ToolchainError(f"{Path(src).name} does not run at input shape {list(shape)}: "
                             f"{str(err).splitlines()[0]}") from None
    onnx.save(model, str(out))
    return out


def output_padding_as_end_pad(node: onnx.NodeProto) -> None:
    """ConvTranspose(pads=[b, e], output_padding=p) == ConvTranspose(pads=[b, e - p]): both keep the same rows of
    the full transposed convolution (output_padding only shortens the crop at the end)."""
    attrs = {a.name: a for a in node.attribute}
    if "output_padding" not in attrs:
        return
    extra = list(attrs["output_padding"].ints)
    rank = len(extra)
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * rank)
    if any(e > pads[rank + i] for i, e in enumerate(extra)) or ("auto_pad" in attrs and attrs["auto_pad"].s not in
                                                                 (b"", b"NOTSET")):
        return
    pads = pads[:rank] + [pads[rank + i] - e for i, e in enumerate(extra)]
    node.attribute.remove(attrs["output_padding"])
    if "pads" in attrs:
        node.attribute.remove(attrs["pads"])
    node.attribute.append(helper.make_attribute("pads", pads))


def record_shapes(model: onnx.ModelProto, input_name: str, shape: tuple) -> None:
    """Write every tensor's real shape into the graph (one onnxruntime run on zeros with all tensors as outputs)."""
    del model.graph.value_info[:]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in model.graph.output}
    tensors = [o for n in model.graph.node for o in n.output if o]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors if t not in outputs)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(None, {input_name: np.zeros(shape, np.float32)})
    info = {o.name: helper.make_tensor_value_info(o.name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
            for o, v in zip(session.get_outputs(), values)}
    for output in model.graph.output:
        output.CopyFrom(info[output.name])
    model.graph.value_info.extend(info[t] for t in tensors if t not in outputs)


# ---------------------------------------------------------------- calibration and the carried quantisation

def fit_to(array: np.ndarray, shape: tuple) -> np.ndarray:
    """``array`` centre-cropped or zero-padded (centred, as ``src.eval`` pads) to ``shape`` (static RKNN input)."""
    out = array
    for axis in (2, 3):
        have, want = out.shape[axis], shape[axis]
        if have > want:
            start = (have - want) // 2
            out = np.take(out, range(start, start + want), axis=axis)
        elif have < want:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((want - have) // 2, want - have - (want - have) // 2)
            out = np.pad(out, pad)
    return np.ascontiguousarray(out, np.float32)


def write_dataset(calibration: list, shape: tuple, folder: Path) -> tuple:
    """The toolkit's dataset file (one .npy per line, NCHW) and how many arrays had to be fitted to ``shape``."""
    lines, fitted = [], 0
    for index, array in enumerate(calibration):
        fitted += array.shape != tuple(shape)
        path = folder / f"calib_{index}.npy"
        np.save(path, fit_to(array, shape))
        lines.append(str(path))
    dataset = folder / "dataset.txt"
    dataset.write_text("\n".join(lines) + "\n")
    return dataset, fitted


def quantised_name(params: list, tensor: str) -> str:
    """The cfg entry of the integer copy the toolkit makes of a graph input/output (``x_int8``, ``symbols_int16``)."""
    for name in params:
        if name.startswith(tensor + "_int"):
            return name
    return tensor


def cfg_tensors(cfg: Path) -> list:
    """Tensor names of a ``.quantization.cfg`` (the keys under ``quantize_parameters``, indented four spaces)."""
    return [m.group(1) for m in re.finditer(r"^    (\S[^\n]*):$", cfg.read_text(), re.MULTILINE)]


def edit_ranges(cfg: Path, ranges: dict) -> tuple:
    """Set min/max of the cfg's tensors to ``ranges`` ({name: (low, high)}); returns (carried, not found).

    Edited as text, line by line: the toolkit compares every scale and zero point with its own and refuses the
    file if one differs, and a YAML round trip rewrites some of their floats."""
    lines = cfg.read_text().splitlines(keepends=True)
    carried, missing = [], []
    for name, (low, high) in ranges.items():
        try:
            at = lines.index(f"    {name}:\n")
        except ValueError:
            missing.append(name)
            continue
        for key, value in (("min", low), ("max", high)):
            row = next(i for i in range(at + 1, len(lines)) if lines[i] == f"        {key}:\n")
            lines[row + 1] = f"        -   {float(value)!r}\n"
        carried.append(name)
    cfg.write_text("".join(lines))
    return carried, missing


def symbol_bits(precision: str) -> int:
    return 16 if PRECISIONS[precision].startswith("w16") else 8


def range_choice():
    """The project's ``src/quant/range_choice.py`` (numpy only) loaded by path, as the Ethos-U worker loads it."""
    spec = importlib.util.spec_from_file_location("project_range_choice", RANGE_CHOICE)
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def cfg_ranges(cfg: Path, key: str = "") -> dict:
    """{tensor: (min, max)} of a ``.quantization.cfg`` as it stands (``key`` "ori_": the toolkit's own ranges)."""
    found = re.finditer(rf"^    (\S[^\n]*):\n(?:        [^\n]*\n)*?        {key}min:\n        -   (\S+)\n"
                        rf"        {key}max:\n        -   (\S+)$", cfg.read_text(), re.MULTILINE)
    return {m.group(1): (float(m.group(2)), float(m.group(3))) for m in found}


def toolkit_tensor_ranges(cfg: Path, graph: Path, calibration: list, method: str) -> tuple:
    """Ranges for the tensors the toolkit's own passes add, so that they round no more than the project's graph.

    - The toolkit cuts a convolution whose filter exceeds its bank (5x5 over 128 input channels: g_a's last three,
      g_s's ConvTransposes) into convolutions over equal chunks of the input channels
      (``tiling_conv_channelin``, ``tiling_deconv_channelin``), fed by a channel Split. A Split only moves
      values, yet each output got the toolkit's own min/max of its half: the source, already on the project's
      grid, was rounded again onto a coarser one (45 % coarser in front of g_a.2 of the RD study's q3 NPU
      encoder). Each output now takes its source's range (a graph input's: that of its integer copy, e.g.
      ``symbols_int8``), so that step rounds nothing.
    - Each tile's partial sum is rounded to int8 before the add that completes the convolution: a rounding the
      project's INT8 graph does not have (its convolution accumulates every channel in int32). It cannot be
      widened (the toolkit refuses a dtype edit, and a float16 tile is cast back to int8 before the add), so it
      gets the project's range rule: the partial is rebuilt from the ONNX convolution over the calibration
      arrays (its chunk of channels; the bias on tile 0, which the toolkit's own min/max of the tensor confirms)
      and its histogram goes through ``range_choice`` as every other tensor's does.

    Returns (ranges, names given a range, partials not rebuilt: left on the toolkit's own range).
    """
    current, own = cfg_ranges(cfg), cfg_ranges(cfg, "ori_")
    ranges = {name: source_range(current, m.group("source")) for name in current
              if (m := SPLIT_OUTPUT.match(name)) and m.group("source") in current}
    tiles = {}
    for name in current:
        if m := TILE_PARTIAL.match(name):
            tiles.setdefault(m.group("conv"), []).append(name)
    if not tiles:
        return ranges, sorted(ranges), []
    model = onnx.load(str(graph))
    convs = {node.output[0]: node for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")
             and all(a.name != "group" or a.i == 1 for a in node.attribute)}  # a grouped one: left as it is
    unmatched = [name for conv, names in tiles.items() if conv not in convs for name in names]
    tiles = {conv: names for conv, names in tiles.items() if conv in convs}
    partials = {conv: TilePartials(model, convs[conv], sum(not TILE_PARTIAL.match(n).group("running") for n in names))
                for conv, names in tiles.items()}
    sources = ConvInputs(model, [p.input for p in partials.values()], calibration)
    lows, highs = {}, {}
    for name, value in tile_values(sources, partials, tiles):
        lows[name] = min(lows.get(name, np.inf), float(value.min()))
        highs[name] = max(highs.get(name, -np.inf), float(value.max()))
    rc = range_choice()
    hists = {}
    for name in lows:
        low, high = own.get(name, (np.nan, np.nan))
        if not max(abs(lows[name] - low), abs(highs[name] - high)) <= TILE_MATCH * max(high - low, 1e-12):
            unmatched.append(name)
        else:
            hists[name] = rc.TensorHistogram(lows[name], max(highs[name], lows[name] + 1e-6),
                                             np.zeros(rc.HISTOGRAM_BINS, np.int64))
    for name, value in tile_values(sources, partials, tiles):
        if name in hists:
            hist = hists[name]
            hist.counts += np.histogram(value, bins=len(hist.counts), range=(hist.low, hist.high))[0]
    ranges.update({name: rc.choose_range(hist, 8, method) for name, hist in hists.items()})
    return ranges, sorted(ranges), sorted(unmatched)


def source_range(current: dict, source: str) -> tuple:
    """The range a Split's source is quantised on: a graph input's integer copy (``<input>_int8``) where the
    toolkit made one, else the tensor's own."""
    copy = next((name for name in current if name.startswith(source + "_int")), None)
    return current[copy] if copy else current[source]


class TilePartials:
    """The partial sums of one ONNX (transposed) convolution cut into ``count`` equal chunks of input channels (the
    bias added to the first), computed with onnxruntime, one calibration array at a time."""

    def __init__(self, model: onnx.ModelProto, conv: onnx.NodeProto, count: int):
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        axis = 1 if conv.op_type == "Conv" else 0  # the weight's input-channel axis
        weight = weights[conv.input[1]]
        bias = weights[conv.input[2]] if len(conv.input) > 2 and conv.input[2] else None
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        self.input, self.chunks = conv.input[0], np.array_split(np.arange(weight.shape[axis]), count)
        nodes, inits, inputs, outputs = [], [], [], []
        for k, chunk in enumerate(self.chunks):
            inits.append(numpy_helper.from_array(np.ascontiguousarray(np.take(weight, chunk, axis)), f"w{k}"))
            names = [f"x{k}", f"w{k}"]
            if k == 0 and bias is not None:
                inits.append(numpy_helper.from_array(bias, "b0"))
                names.append("b0")
            nodes.append(helper.make_node(conv.op_type, names, [f"y{k}"], **attrs))
            inputs.append(helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT, None))
            outputs.append(helper.make_tensor_value_info(f"y{k}", onnx.TensorProto.FLOAT, None))
        graph = helper.make_graph(nodes, "tiles", inputs, outputs, inits)
        self.session = ort.InferenceSession(helper.make_model(graph, opset_imports=model.opset_import)
                                            .SerializeToString(), providers=["CPUExecutionProvider"])

    def value(self, name: str, partials: list) -> np.ndarray:
        """The toolkit tensor ``name`` of this convolution: a tile's partial sum, or a running sum of tiles."""
        found = TILE_PARTIAL.match(name)
        index = int(found.group("index"))
        return sum(partials[:index + 2]) if found.group("running") else partials[index]

    def run(self, x: np.ndarray) -> list:
        """The tiles' partial sums of the convolution's input ``x``, tile 0 first."""
        return self.session.run(None, {f"x{k}": np.ascontiguousarray(x[:, chunk])
                                       for k, chunk in enumerate(self.chunks)})


def tile_values(sources, partials: dict, tiles: dict):
    """(partial's name, its values) for every tile of every cut convolution, one calibration array at a time."""
    for values in sources:
        for conv, names in tiles.items():
            tiled = partials[conv]
            computed = tiled.run(values[tiled.input])
            yield from ((name, tiled.value(name, computed)) for name in names)


class ConvInputs:
    """The named tensors of the graph on each calibration array, computed again on each pass (a 768x512 photo's
    tensors are too large to keep for ten of them)."""

    def __init__(self, model: onnx.ModelProto, names: list, calibration: list):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names))
        self.session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        self.names, self.calibration = list(dict.fromkeys(names)), calibration
        self.input = model.graph.input[0].name

    def __iter__(self):
        outputs = [o.name for o in self.session.get_outputs()]
        for array in self.calibration:
            values = dict(zip(outputs, self.session.run(None, {self.input: array})))
            yield {n: values[n] for n in self.names}


def planned_ranges(part_name: str, part: dict, precision: str, params: list) -> dict:
    """Ranges to write: the job's ``tensor_ranges`` and the symbol tensor on the integer grid (scale 1, zp 0).

    None under ``w16a16i_dfp``: its power-of-two scales come from its own ranges, and an edited range there fails
    inside the toolkit (a symbol range of +-32768 "is too large for 'w16a16i_dfp'", +-16384 divides by zero)."""
    if PRECISIONS[precision] != "w8a8":
        return {}
    ranges = {name: (low, high) for name, (low, high, *_bits) in (part.get("tensor_ranges") or {}).items()}
    symbol_tensor = part["output"] if part_name == "encoder" else part["input"]
    ranges[quantised_name(params, symbol_tensor)] = SYMBOL_RANGE[symbol_bits(precision)]
    return ranges


# ---------------------------------------------------------------- the toolkit, its log and its report

@contextlib.contextmanager
def toolkit_log(path: Path):
    """Send the process's stdout/stderr (the toolkit's Python and C++ logs) into ``path`` while the toolkit runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def last_error(log: Path) -> str:
    """The toolkit's own last error line in ``log`` (its ``E ...`` lines, or the exception it raised)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace")) if log.exists() else ""
    errors = [line.strip() for line in text.splitlines()
              if re.match(r"^(E |\S*Error: )", line.strip()) and "Traceback" not in line and "version" not in line]
    return errors[-1] if errors else "no error message in the toolkit's log"


def check(status, step: str, part: str, log: Path) -> None:
    if status != 0:
        raise ToolchainError(f"rknn-toolkit2 {step} failed for the {part}: {last_error(log)}")


def layer_table(log: Path, since: int) -> list:
    """Rows of the last "Network Layer Information Table" written to ``log`` after byte ``since``."""
    text = log.read_text(errors="replace")[since:]
    start = text.rfind("Network Layer Information Table")
    if start < 0:
        return []
    rows = []
    for line in text[start:].splitlines()[1:]:
        if "Feature Tensor Information Table" in line:
            break
        match = LAYER_ROW.match(line.strip())
        if match:
            (_id, op, dtype, target, _in, _out, ddr, npu, total, rw_kb, full_name) = match.groups()
            rows.append({"op": op, "dtype": dtype, "target": target, "cycles_ddr": int(ddr), "cycles_npu": int(npu),
                         "cycles_total": int(total), "rw_kb": int(rw_kb), "name": full_name})
    return rows


def memory_sizes(log: Path, since: int) -> dict:
    text = log.read_text(errors="replace")[since:]
    return {f"{kind.lower()}_memory_kb": float(size) for kind, size in MEMORY_ROW.findall(text)}


def placement(rows: list) -> dict:
    """Operator counts and fallbacks from the compiler's layer table (its input/output operators excluded)."""
    ops = [r for r in rows if r["op"] not in PSEUDO_OPS]
    return {"ops_total": len(ops), "ops_npu": sum(r["target"] == "NPU" for r in ops),
            "fallbacks": [{"op": r["op"], "name": r["name"],
                           "reason": f"placed on {r['target']} ({r['dtype']}) in the compiler's Network Layer "
                                     "Information Table; rknn-toolkit2 2.5.0 prints no reason"}
                          for r in ops if r["target"] != "NPU"],
            "layers": [{k: r[k] for k in ("op", "name", "target", "dtype")} for r in ops]}


def estimates(rows: list, memory: dict) -> dict:
    """The compiler's own offline numbers: its per-layer cycle estimates summed, its memory plan."""
    ops = [r for r in rows if r["op"] not in PSEUDO_OPS]
    return {"cycles_total": sum(r["cycles_total"] for r in ops), "cycles_npu": sum(r["cycles_npu"] for r in ops),
            "cycles_ddr": sum(r["cycles_ddr"] for r in ops), "rw_kb": sum(r["rw_kb"] for r in ops), **memory,
            "source": "rknn-toolkit2 build log: Network Layer Information Table (Cycles DDR/NPU/Total, RW KB) and "
                      "its memory statistics; eval_perf/eval_memory need a board and are not run"}


# ---------------------------------------------------------------- one part

def compile_part(name: str, part: dict, job: dict, work: Path) -> dict:
    """Quantise, compile, export and simulate one part at its compile shape (and once more per other eval shape:
    RKNN models are static); returns its report entry, counts and estimates at the compile shape."""
    eval_arrays = arrays(part["eval"]) if part.get("eval") else []  # none: compiled and reported only
    calibration = arrays(part["calibration"])
    if not calibration or (part.get("eval") and not eval_arrays):
        raise ToolchainError(f"part {name!r}: calibration and eval need at least one array each")
    compile_shape = tuple(int(v) for v in (part.get("compile_shape") or calibration[0].shape))
    shapes = list(dict.fromkeys([compile_shape] + [tuple(a.shape) for a in eval_arrays]))
    log = work / f"{name}_toolkit.log"
    outputs, extra, built = [None] * len(eval_arrays), [], None
    for shape in shapes:
        stem = name if shape == compile_shape else f"{name}_{shape[2]}x{shape[3]}"
        rknn, info = compile_at(name, stem, part, job, work, shape, calibration, log)
        try:
            with toolkit_log(log):
                for index, array in enumerate(eval_arrays):
                    if tuple(array.shape) == shape:
                        outputs[index] = simulate(rknn, array, name, log)
        except ToolchainError:
            raise
        except Exception as err:
            raise ToolchainError(f"rknn-toolkit2 inference (simulator) failed for the {name}: {one_line(err)}") from None
        finally:
            with toolkit_log(log):
                rknn.release()
        if shape == compile_shape:
            built = info
        else:
            extra.append(f"{stem}.rknn")
    np.savez(work / f"{name}_outputs.npz", *outputs)
    found = placement(built["rows"])
    symbol_tensor = part["output"] if name == "encoder" else part["input"]
    return {"artefact": f"{name}.rknn", "artefacts_other_shapes": extra,
            **{k: found[k] for k in ("ops_total", "ops_npu", "fallbacks")},
            "estimates": estimates(built["rows"], built["memory"]), "input_shape": list(compile_shape),
            "layers": found["layers"],
            "quantisation": quantisation_report(name, job["precision"], built, symbol_tensor, len(calibration),
                                                outputs, job["range_method"]),
            "toolkit_log": log.name}


def compile_at(name: str, stem: str, part: dict, job: dict, work: Path, shape: tuple, calibration: list,
               log: Path):
    """The RKNN model of one part at one static ``shape``, exported to ``<stem>.rknn`` and ready on the simulator.

    Returns the toolkit object (the caller runs and releases it) and what the build printed and carried."""
    folder = work / f".{stem}"
    folder.mkdir()
    graph = static_graph(part["onnx"], part["input"], shape, folder / f"{name}.onnx")
    dataset, fitted = write_dataset(calibration, shape, folder)
    cwd = os.getcwd()
    rknn = None
    try:
        with toolkit_log(log):
            rknn = new_toolkit()
            os.chdir(folder)
            check(rknn.config(target_platform=job["target"], quantized_dtype=PRECISIONS[job["precision"]],
                              quantized_algorithm="normal", quantized_method="channel"), "config", name, log)
            check(rknn.load_onnx(str(graph)), "load_onnx", name, log)
            check(rknn.hybrid_quantization_step1(dataset=str(dataset)), "hybrid_quantization_step1", name, log)
        cfg = folder / f"{graph.stem}.quantization.cfg"
        carried, missing = edit_ranges(cfg, planned_ranges(name, part, job["precision"], cfg_tensors(cfg)))
        given, unmatched = [], []
        if PRECISIONS[job["precision"]] == "w8a8":
            ranges, given, unmatched = toolkit_tensor_ranges(cfg, graph, [fit_to(a, shape) for a in calibration],
                                                             job["range_method"])
            edit_ranges(cfg, ranges)
        build_starts = log.stat().st_size
        with toolkit_log(log):
            rknn.release()
            rknn = new_toolkit()
            check(rknn.config(target_platform=job["target"], quantized_dtype=PRECISIONS[job["precision"]],
                              quantized_algorithm="normal", quantized_method="channel"), "config", name, log)
            check(rknn.hybrid_quantization_step2(str(folder / f"{graph.stem}.model"),
                                                 str(folder / f"{graph.stem}.data"), str(cfg)),
                  "hybrid_quantization_step2 (build)", name, log)
            check(rknn.export_rknn(str(work / f"{stem}.rknn")), "export_rknn", name, log)
            check(rknn.init_runtime(), "init_runtime (simulator)", name, log)
    except Exception as err:
        if rknn is not None:
            with toolkit_log(log):
                rknn.release()
        if isinstance(err, ToolchainError):
            raise
        raise ToolchainError(f"rknn-toolkit2 failed for the {name}: {one_line(err)}") from None
    finally:
        os.chdir(cwd)
    rows = layer_table(log, build_starts)
    if not rows:
        raise ToolchainError(f"rknn-toolkit2 printed no layer table for the {name}")
    shutil.rmtree(folder)
    return rknn, {"rows": rows, "memory": memory_sizes(log, build_starts), "carried": carried, "missing": missing,
                  "given_ranges": given, "unmatched": unmatched, "fitted": fitted}


def new_toolkit():
    """An RKNN object (imported here: the toolkit prints on import, and that goes to the part's log)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own pkg_resources deprecation
        from rknn.api import RKNN
        return RKNN(verbose=True)


def simulate(rknn, array: np.ndarray, part: str, log: Path) -> np.ndarray:
    result = rknn.inference(inputs=[array], data_format="nchw")
    if result is None:
        raise ToolchainError(f"rknn-toolkit2 inference (simulator) failed for the {part}: {last_error(log)}")
    return np.asarray(result[0], np.float32)


def quantisation_report(name: str, precision: str, built: dict, symbol_tensor: str, calib_count: int,
                        outputs: list, range_method: str) -> dict:
    """What of the project's quantisation reached the toolkit, and what did not."""
    carried, missing, unmatched = built["carried"], built["missing"], built["unmatched"]
    low, high = SYMBOL_RANGE[symbol_bits(precision)]
    interface = (f"{symbol_tensor} on [{low:.0f}, {high:.0f}] (scale 1, zero point 0) via hybrid_quantization "
                 "cfg min/max") if carried else "not carried (the toolkit's own range)"
    report = {"toolkit_dtype": PRECISIONS[precision], "carried": carried, "symbol_interface": interface,
              "toolkit_tensors": {"given_ranges": built["given_ranges"], "not_rebuilt": unmatched,
                                  "rule": f"channel Split outputs: their source's range; channel-tile partial sums: "
                                          f"the project's '{range_method}' range of the rebuilt partial"},
              "calibration_arrays": calib_count, "calibration_fitted_to_shape": built["fitted"]}
    lost = []
    if missing:
        lost.append(f"{len(missing)} tensor_ranges name tensors the toolkit's graph does not have "
                    f"(fused or renamed by its optimiser): {', '.join(missing[:20])}")
    if unmatched:
        lost.append(f"{len(unmatched)} channel-tile partial sums could not be rebuilt from the ONNX convolution and "
                    f"keep the toolkit's own range: {', '.join(unmatched[:20])}")
    if precision == "a16w8":
        lost.append("RK3588 has no w8a16 in rknn-toolkit2 2.5.0: a16w8 runs as w16a16i_dfp (16-bit weights too, "
                    "power-of-two scales from the toolkit's own ranges); neither the symbol interface nor "
                    "tensor_ranges can be written into its cfg, so the encoder's output is not rounded on the "
                    "target (the host rounds it)")
    if name == "encoder" and outputs:
        off_grid = max(float(np.abs(o - np.round(o)).max()) for o in outputs)
        report["symbols_max_distance_to_integer"] = off_grid
        if off_grid > 0:
            lost.append(f"encoder output not on the integer grid (max distance {off_grid:.3g})")
    report["lost"] = "; ".join(lost) if lost else "nothing"
    return report


# ---------------------------------------------------------------- the run and its atomic hand-over

def toolkit_version() -> str:
    from importlib.metadata import version
    return version(TOOLKIT)


def publish(work: Path, out_dir: Path, report: dict) -> None:
    """Move the finished files into ``out_dir`` (each by one rename) and merge report.json's parts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = out_dir / "report.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        if (old.get("target"), old.get("precision")) == (report["target"], report["precision"]):
            report["parts"] = {**old.get("parts", {}), **report["parts"]}
    (work / "report.json").write_text(json.dumps(report, indent=2))
    for path in sorted(work.iterdir()):
        if path.is_file():
            os.replace(path, out_dir / path.name)


def one_line(err: BaseException) -> str:
    """The toolkit raises exceptions whose text is a whole traceback: keep its last ``...Error: ...`` line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith(" ")]
    found = next((line for line in reversed(lines) if "Error" in line and "Traceback" not in line), None)
    return found or f"{type(err).__name__}: {lines[-1] if lines else ''}"


def keep_logs(work: Path, out_dir: Path) -> str:
    """After a failure: the toolkit's logs beside ``out_dir`` (never inside it), for the user to read."""
    logs = sorted(work.glob("*_toolkit.log"))
    if not logs:
        return ""
    kept = out_dir.parent / f"{out_dir.name}.failed.log"
    kept.write_text("".join(log.read_text(errors="replace") for log in logs))
    return str(kept)


def run(job_path: Path) -> dict:
    job = read_job(job_path)
    ort.set_default_logger_severity(4)  # the toolkit's own onnxruntime sessions log failures past our redirect
    out_dir = Path(job["out_dir"]).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        try:
            parts = {name: compile_part(name, part, job, work) for name, part in job["parts"].items()}
        except Exception as err:
            kept = keep_logs(work, out_dir)
            message = err.args[0] if isinstance(err, ToolchainError) else one_line(err)
            raise ToolchainError(f"{message} (toolkit log: {kept})" if kept else message) from None
        report = {"target": job["target"], "precision": job["precision"],
                  "toolchain": {"name": TOOLKIT, "version": toolkit_version()}, "parts": parts}
        publish(work, out_dir, report)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list) -> int:
    if len(argv) != 1:
        print("usage: worker.py JOB.json", file=sys.stderr)
        return 2
    try:
        report = run(Path(argv[0]))
    except ToolchainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a failure outside the toolkit's calls: still one line
        print(f"error: rknn worker: {one_line(err)}", file=sys.stderr)
        return 2
    for name, part in report["parts"].items():
        print(f"{report['target']} {report['precision']} {name}: {part['ops_npu']}/{part['ops_total']} ops on the NPU, "
              f"{len(part['fallbacks'])} fallbacks -> {Path(report['parts'][name]['artefact']).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
