"""RD curves and their Bjøntegaard deltas, the way image-compression papers compare codecs.

A codec is a curve: one checkpoint per rate point, each measured on the same
held-out images. Two curves are compared by the Bjøntegaard delta
(VCEG-M33): **BD-rate**, the mean rate difference in percent at equal quality
(negative = fewer bits), and **BD-PSNR** (or BD-quality), the mean quality
difference at equal rate. The deltas come from the ``bjontegaard`` package with
``pchip`` interpolation, the piecewise-cubic method of the JCT-VC/JVET common
test conditions (it matches their Excel sheet). Rate is the real bitstream
bpp. Quality is PSNR and MS-SSIM, the latter in dB (``-10*log10(1-MS-SSIM)``)
as CompressAI's plots draw it.

A delta is only reported where it means something: both curves need at least
``MIN_POINTS`` points (the CTC's four), and the two curves must overlap on the
axis the delta integrates over (quality for BD-rate, rate for BD-quality).
Otherwise the reason is reported instead of a number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import bjontegaard
import numpy as np

MIN_POINTS = 4
MIN_OVERLAP = 0.75  # below this share of the joint range, a delta is an average over a narrow band: say so
BD_METHOD = "pchip"
QUALITY_AXES = ("psnr", "ms_ssim_db")  # the quality measures every curve is compared in
AXIS_LABELS = {"psnr": "PSNR [dB]", "ms_ssim_db": "MS-SSIM [dB]"}
BD_QUALITY_NAMES = {"psnr": "BD-PSNR", "ms_ssim_db": "BD-MS-SSIM"}


def msssim_db(ms_ssim: float) -> float:
    """MS-SSIM on CompressAI's dB scale, ``-10*log10(1 - MS-SSIM)``."""
    return -10.0 * math.log10(max(1.0 - ms_ssim, 1e-12))


def parse_curve(text: str) -> Tuple[str, List[str]]:
    """``NAME=CKPT[,CKPT...]`` -> (name, checkpoints); ValueError with the expected form otherwise."""
    name, sep, paths = text.partition("=")
    checkpoints = [p.strip() for p in paths.split(",") if p.strip()]
    if not sep or not name.strip() or not checkpoints:
        raise ValueError(f"--curve {text!r}: expected NAME=CKPT[,CKPT...]")
    return name.strip(), checkpoints


def curve_point(mean: Mapping[str, float], checkpoint: str) -> Dict[str, Any]:
    """One rate point from an eval result's means."""
    return {"checkpoint": checkpoint, "bpp": mean["bpp_real"], "psnr": mean["psnr"], "ms_ssim": mean["ms_ssim"],
            "ms_ssim_db": msssim_db(mean["ms_ssim"])}


def _sorted(points: Sequence[Mapping[str, float]], x: str, y: str) -> Tuple[np.ndarray, np.ndarray]:
    pts = sorted(points, key=lambda p: p[x])
    return np.array([p[x] for p in pts], dtype=float), np.array([p[y] for p in pts], dtype=float)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the joint range of ``a`` and ``b`` that both cover (0 = disjoint)."""
    inner = min(a.max(), b.max()) - max(a.min(), b.min())
    return max(inner, 0.0) / (max(a.max(), b.max()) - min(a.min(), b.min()))


def _overlap_problem(a: np.ndarray, b: np.ndarray, what: str, unit: str) -> str:
    if _overlap(a, b) == 0:
        return (f"{what} ranges do not overlap ({a.min():.3f}..{a.max():.3f} vs "
                f"{b.min():.3f}..{b.max():.3f} {unit})")
    return ""


def _narrow_note(a: np.ndarray, b: np.ndarray, delta: str, axis: str) -> List[str]:
    share = _overlap(a, b)
    if share >= MIN_OVERLAP:
        return []
    return [f"{delta} averages over {100 * share:.0f}% of the curves' joint {axis} range (narrow overlap)"]


def _distinct_problem(values: np.ndarray, name: str, what: str) -> str:
    return f"{name} has two points at the same {what}" if len(np.unique(values)) < len(values) else ""


def bd_deltas(anchor: Sequence[Mapping[str, float]], test: Sequence[Mapping[str, float]], axis: str,
              anchor_name: str = "anchor", test_name: str = "test") -> Dict[str, Any]:
    """BD-rate (%) and BD-quality (dB) of ``test`` against ``anchor`` on quality ``axis``.

    Returns ``{"bd_rate": float | None, "bd_quality": float | None, "notes": [...]}``:
    a value is None where it cannot be computed, and ``notes`` says why (or warns
    of a small overlap, which makes the delta an extrapolation-free but narrow average).
    """
    result: Dict[str, Any] = {"bd_rate": None, "bd_quality": None, "notes": []}
    for name, points in ((anchor_name, anchor), (test_name, test)):
        _, quality = _sorted(points, "bpp", axis)
        if np.any(np.diff(quality) <= 0):
            result["notes"].append(f"{name} is not monotonic ({axis} does not rise with every rate step): "
                                   "its deltas interpolate a curve that turns back")
    if len(anchor) < MIN_POINTS or len(test) < MIN_POINTS:
        result["notes"].append(f"needs at least {MIN_POINTS} points per curve ({anchor_name} has {len(anchor)}, "
                               f"{test_name} has {len(test)})")
        return result
    q_a, r_a = _sorted(anchor, axis, "bpp")
    q_t, r_t = _sorted(test, axis, "bpp")
    problem = (_distinct_problem(q_a, anchor_name, axis) or _distinct_problem(q_t, test_name, axis)
               or _overlap_problem(q_a, q_t, "quality", AXIS_LABELS[axis]))
    if problem:
        result["notes"].append(f"no BD-rate: {problem}")
    else:
        result["bd_rate"] = _bd(bjontegaard.bd_rate, r_a, q_a, r_t, q_t)
        result["notes"] += _narrow_note(q_a, q_t, "BD-rate", AXIS_LABELS[axis])
    r_a, q_a = _sorted(anchor, "bpp", axis)
    r_t, q_t = _sorted(test, "bpp", axis)
    problem = (_distinct_problem(r_a, anchor_name, "rate") or _distinct_problem(r_t, test_name, "rate")
               or _overlap_problem(r_a, r_t, "rate", "bpp"))
    if problem:
        result["notes"].append(f"no {BD_QUALITY_NAMES[axis]}: {problem}")
    else:
        result["bd_quality"] = _bd(bjontegaard.bd_psnr, r_a, q_a, r_t, q_t)
        result["notes"] += _narrow_note(r_a, r_t, BD_QUALITY_NAMES[axis], "rate")
    return result


def _bd(function, rate_anchor, dist_anchor, rate_test, dist_test) -> float:
    """A ``bjontegaard`` delta; overlap was checked above and is reported as a note, not a warning."""
    return float(function(rate_anchor, dist_anchor, rate_test, dist_test, method=BD_METHOD,
                          require_matching_points=False, min_overlap=0))


def compare_curves(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> Dict[str, Dict[str, Any]]:
    """Each curve against the first: ``{name: {axis: bd_deltas(...)}}`` (the first is the anchor)."""
    names = list(curves)
    anchor = names[0]
    return {name: {axis: bd_deltas(curves[anchor], curves[name], axis, anchor, name) for axis in QUALITY_AXES}
            for name in names[1:]}


def _fmt(value, unit: str) -> str:
    return "n/a" if value is None else f"{value:+.2f}{unit}"


def curves_table(curves: Mapping[str, Sequence[Mapping[str, float]]], deltas: Mapping[str, Mapping]) -> str:
    """The points of every curve, then the BD figures of each against the first, with the reasons for any n/a."""
    lines = [f"{'curve':<20}{'checkpoint':<36}{'bpp real':>9}{'PSNR':>8}{'MS-SSIM':>9}{'MS-SSIM dB':>11}"]
    for name, points in curves.items():
        for p in sorted(points, key=lambda p: p["bpp"]):
            label = str(Path(p["checkpoint"]).parent.name + "/" + Path(p["checkpoint"]).name)[-35:]
            lines.append(f"{name[:19]:<20}{label:<36}{p['bpp']:>9.4f}{p['psnr']:>8.3f}{p['ms_ssim']:>9.4f}"
                         f"{p['ms_ssim_db']:>11.3f}")
    anchor = next(iter(curves))
    lines.append("")
    if not deltas:
        return "\n".join(lines + [f"no Bjøntegaard deltas: '{anchor}' is the only curve (add a second --curve)"])
    lines.append(f"Bjøntegaard deltas against '{anchor}' ({BD_METHOD}, real bpp; BD-rate < 0 = fewer bits):")
    lines.append(f"{'curve':<20}{'BD-rate PSNR':>14}{'BD-PSNR':>10}{'BD-rate MS-SSIM':>17}{'BD-MS-SSIM':>12}")
    notes = []
    for name, by_axis in deltas.items():
        p, m = by_axis["psnr"], by_axis["ms_ssim_db"]
        lines.append(f"{name[:19]:<20}{_fmt(p['bd_rate'], '%'):>14}{_fmt(p['bd_quality'], ' dB'):>10}"
                     f"{_fmt(m['bd_rate'], '%'):>17}{_fmt(m['bd_quality'], ' dB'):>12}")
        notes += [f"note: {name}, {axis}: {note}" for axis, d in by_axis.items() for note in d["notes"]]
    return "\n".join(lines + sorted(set(notes), key=notes.index))


def bd_markdown(deltas: Mapping[str, Mapping]) -> str:
    """The BD figures of ``compare_curves`` as a markdown table (for docs)."""
    lines = ["| curve | BD-rate (PSNR) | BD-PSNR | BD-rate (MS-SSIM) | BD-MS-SSIM |", "| --- | --- | --- | --- | --- |"]
    for name, by_axis in deltas.items():
        p, m = by_axis["psnr"], by_axis["ms_ssim_db"]
        lines.append(f"| {name} | {_fmt(p['bd_rate'], ' %')} | {_fmt(p['bd_quality'], ' dB')} | "
                     f"{_fmt(m['bd_rate'], ' %')} | {_fmt(m['bd_quality'], ' dB')} |")
    return "\n".join(lines)


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: Path, title: str = "") -> None:
    """PSNR and MS-SSIM (dB) against real bpp, one line per curve, as CompressAI's plots draw them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, points in curves.items():
        pts = sorted(points, key=lambda p: p["bpp"])
        for ax, key in zip(axes, QUALITY_AXES):
            ax.plot([p["bpp"] for p in pts], [p[key] for p in pts], "o-", label=name, markersize=4)
    for ax, key in zip(axes, QUALITY_AXES):
        ax.set_xlabel("bpp (real bitstream)")
        ax.set_ylabel(AXIS_LABELS[key])
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
