"""The runtimes a bundle's graphs run on (onnxruntime, OpenVINO), and what each executes in which precision.

Each runtime is imported where it is used: decoding on onnxruntime never
loads OpenVINO, and the other way round.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Dict, Mapping

import numpy as np

from src.cli import UserError

RUNTIMES = ("onnxruntime", "openvino")
Graph = Callable[[np.ndarray], np.ndarray]


def load_graph(path: Path, runtime: str) -> Graph:
    """One graph on the CPU of ``runtime``, as a function of its single input array to its single output."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda array: session.run(None, {name: array})[0]
    if runtime == "openvino":
        compiled = openvino_model(path)
        output = compiled.output(0)
        return lambda array: compiled([array])[output]
    raise UserError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")


def openvino_model(path: Path):
    """OpenVINO's CPU plugin, with float parts kept in f32 (its default on bf16/AMX CPUs is bf16 inference)."""
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


# Integer kernels as the runtimes name them: onnxruntime's QLinear*/…Integer ops; OpenVINO's layers whose
# runtime precision is an integer type.
INTEGER_PRECISIONS = ("u8", "i8", "u16", "i16")
QUANTISE_OPS = ("QuantizeLinear", "DequantizeLinear", "FakeQuantize", "Convert")
LAYOUT_OPS = ("Transpose", "DepthToSpace", "SpaceToDepth", "Reorder", "Reshape", "ReorderInput", "ReorderOutput")
PLUMBING_OPS = ("Const", "Input", "Parameter", "Output", "Result", "Shape", "Identity")


def runtime_audit(path: Path, runtime: str) -> Dict[str, Dict[str, int]]:
    """What ``runtime`` executes for the graph at ``path``, after its own graph optimisations.

    ``{"integer": {op: n}, "float": {op: n}, "quantise": {op: n}, "layout": {op: n}}``:
    compute ops that run on integer kernels, compute ops that run in float,
    the (de)quantise steps between them, and data movement (no arithmetic). onnxruntime: the nodes of the graph it
    optimised (QDQ groups fused into ``QLinearConv`` etc.); OpenVINO: the
    layers of the compiled CPU model with their runtime precision.
    """
    found: Dict[str, Dict[str, int]] = {"integer": {}, "float": {}, "quantise": {}, "layout": {}}

    def count(kind: str, op: str) -> None:
        found[kind][op] = found[kind].get(op, 0) + 1

    if runtime == "onnxruntime":
        import onnx
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            options.log_severity_level = 3  # the saved graph is this machine's: that is what the audit wants
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            nodes = onnx.load(options.optimized_model_filepath).graph.node
        for node in nodes:
            op = node.op_type
            if op in QUANTISE_OPS or op in LAYOUT_OPS:
                count("quantise" if op in QUANTISE_OPS else "layout", op)
            elif op not in PLUMBING_OPS:
                count("integer" if op.startswith("QLinear") or op.endswith("Integer") else "float", op)
    elif runtime == "openvino":
        for op in openvino_model(path).get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
            if layer in QUANTISE_OPS or layer in LAYOUT_OPS:
                count("quantise" if layer in QUANTISE_OPS else "layout", layer)
            elif layer not in PLUMBING_OPS:
                count("integer" if precision in INTEGER_PRECISIONS else "float", layer)
    else:
        raise UserError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    return {kind: dict(sorted(ops.items())) for kind, ops in found.items()}


def audit_line(found: Mapping[str, Mapping[str, int]]) -> str:
    def ops(kind: str) -> str:
        return ", ".join(f"{op}x{n}" for op, n in found[kind].items()) or "none"

    return (f"integer: {ops('integer')} | float: {ops('float')} | (de)quantise: {ops('quantise')} | "
            f"layout: {ops('layout')}")
