"""Activation statistics and ranges: histograms of an FP32 graph's tensors, and the range each is quantised on.

``RANGE_METHODS`` (``src.quant.scheme``): ``mse`` (the default) picks per
tensor the clipping range whose quantisation error (rounding inside,
clipping outside) is smallest for that tensor's bit-width; ``minmax`` is
onnxruntime's default, set by a few outlier pixels; ``percentile`` clips a
fixed 0.01 % tail on each side. Histograms come from whole calibration
images (never the training crops, whose statistics differ from the images
the codec codes), through onnxruntime's own calibrator.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import create_calibrator

from src.quant.scheme import RANGE_METHODS

HISTOGRAM_BINS = 4096
PERCENTILE_TAIL = 1e-4


@dataclass
class TensorHistogram:
    """Counts of one tensor's values over fixed bins (the tensor's min..max on the calibration images)."""
    low: float
    high: float
    counts: np.ndarray = field(default=None)

    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, len(self.counts) + 1)


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


def quantisation_error(hist: TensorHistogram, lows: np.ndarray, highs: np.ndarray, bits: int) -> np.ndarray:
    """Mean squared error of quantising the histogram's values on each [low, high] (arrays of candidates).

    Inside the range the rounding error is uniform (step^2 / 12); outside, a
    value costs its squared distance to the range's edge. Prefix sums of the
    counts and of the first two moments make each candidate O(1).
    """
    edges = hist.edges()
    centres, counts = (edges[:-1] + edges[1:]) / 2, hist.counts.astype(np.float64)
    zero = np.zeros(1)
    n, s1, s2 = (np.concatenate([zero, np.cumsum(v)]) for v in (counts, counts * centres, counts * centres ** 2))
    lows, highs = np.asarray(lows, np.float64), np.asarray(highs, np.float64)
    below = np.searchsorted(centres, lows)            # bins whose centre lies under low
    above = np.searchsorted(centres, highs, "right")  # bins whose centre lies at or under high
    total = n[-1]
    err_below = lows ** 2 * n[below] - 2 * lows * s1[below] + s2[below]
    err_above = (highs ** 2 * (total - n[above]) - 2 * highs * (s1[-1] - s1[above]) + (s2[-1] - s2[above]))
    step = (highs - lows) / (2 ** bits - 1)
    err_inside = (n[above] - n[below]) * step ** 2 / 12.0
    return (err_below + err_above + err_inside) / max(total, 1.0)


def choose_range(hist: TensorHistogram, bits: int, method: str) -> Tuple[float, float]:
    """The [low, high] an activation is quantised on (0 always inside, as onnxruntime requires)."""
    low, high = min(hist.low, 0.0), max(hist.high, 0.0)
    if method == "minmax":
        return low, high
    cumulative = np.cumsum(hist.counts) / max(hist.counts.sum(), 1)
    edges = hist.edges()
    if method == "percentile":
        lo = edges[np.searchsorted(cumulative, PERCENTILE_TAIL)]
        hi = edges[min(np.searchsorted(cumulative, 1 - PERCENTILE_TAIL) + 1, len(edges) - 1)]
        return min(float(lo), 0.0), max(float(hi), 0.0)
    if method != "mse":
        raise ValueError(f"range method must be one of {RANGE_METHODS}, got {method!r}")
    # Candidates: each end shrunk towards 0 on its own, 2 % steps down to 5 % of the full range.
    shrink = np.linspace(1.0, 0.05, 48)
    lows, highs = np.meshgrid(low * shrink, high * shrink, indexing="ij")
    errors = quantisation_error(hist, lows.ravel(), highs.ravel(), bits)
    best = int(np.argmin(errors))
    return float(lows.ravel()[best]), float(highs.ravel()[best])
