"""The range an activation is quantised on, from its histogram: numpy and the standard library only.

Kept apart from ``src.quant.ranges`` (which collects the histograms with onnxruntime) so that the NPU toolchain
workers, which run in their own venvs and import nothing else of the project, can load this one file by path and
choose each TFLite tensor's range exactly as the project's ONNX INT8 does (``targets/ethosu/worker.py``).

``RANGE_METHODS``: ``mse`` (the default) picks per tensor the clipping range whose quantisation error (rounding
inside, clipping outside) is smallest for that tensor's bit-width; ``minmax`` is onnxruntime's default, set by a
few outlier pixels; ``percentile`` clips a fixed 0.01 % tail on each side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import numpy as np

RANGE_METHODS = ("mse", "minmax", "percentile")
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
