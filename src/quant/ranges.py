"""Activation statistics and ranges: histograms of an FP32 graph's tensors, and the range each is quantised on.

The range methods and the choice itself are in ``src.quant.range_choice`` (numpy only, so the NPU toolchain
workers share it) and re-exported here. Histograms come from whole calibration images (never the training crops,
whose statistics differ from the images the codec codes), through onnxruntime's own calibrator.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import create_calibrator

from src.quant.range_choice import HISTOGRAM_BINS, TensorHistogram, choose_range, quantisation_error

__all__ = ["HISTOGRAM_BINS", "TensorHistogram", "activation_histograms", "choose_range", "quantisation_error"]


def activation_histograms(model_path: Path, inputs: Sequence[np.ndarray], bins: int = HISTOGRAM_BINS
                          ) -> Dict[str, TensorHistogram]:
    """Histograms of every tensor ``quantize_static`` quantises, over ``inputs`` (two passes: range, then counts).

    onnxruntime's own calibrator chooses the tensors and runs the graph with
    them as extra outputs (``create_calibrator``); one input at a time, so
    whole images fit in memory.
    """
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(model_path), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Percentile)
        names = sorted(calibrator.tensors_to_calibrate)
        sess = calibrator.infer_session
        input_name = sess.get_inputs()[0].name
        outputs = [o.name for o in sess.get_outputs()]
        wanted = [outputs.index(n) for n in names]

        def tensors(array):
            got = sess.run(None, {input_name: array})
            return {n: got[i] for n, i in zip(names, wanted)}

        low = {n: np.inf for n in names}
        high = {n: -np.inf for n in names}
        for array in inputs:
            for n, t in tensors(array).items():
                low[n], high[n] = min(low[n], float(t.min())), max(high[n], float(t.max()))
        hists = {n: TensorHistogram(low[n], high[n] if high[n] > low[n] else low[n] + 1e-6,
                                    np.zeros(bins, dtype=np.int64)) for n in names}
        for array in inputs:
            for n, t in tensors(array).items():
                h = hists[n]
                h.counts += np.histogram(t, bins=bins, range=(h.low, h.high))[0]
    return hists
