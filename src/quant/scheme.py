"""What a quantised model is, as plain values: the PTQ profiles and range methods, the QAT scheme.

Torch-free and onnx-free on purpose: the flags (``src.train_args``), the
architecture description (``src.model_factory``) and the checkpoint reader
need these lists and the scheme dict, and must not load the quantisation
stack (onnx, onnxruntime) to get them. ``src.quant.ptq`` and
``src.quant.qat`` do the work these values name.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from src.quant.range_choice import RANGE_METHODS  # numpy only: the flags may list it

# PTQ (src.quant.ptq): which activations get 16 bits, and how each activation's range is chosen.
PROFILES = {
    "w8a8": "every activation 8-bit, weights 8-bit (strict integer NPUs)",
    "a16w8": "16-bit activations on the main path (stage outputs, residual sums, y_hat), 8-bit inside the blocks; "
             "weights 8-bit (Qualcomm HTP's A16W8)",
}
DEFAULT_PROFILE, DEFAULT_RANGE_METHOD = "w8a8", "mse"

QAT_PARTS = ("g_a", "g_s")
SCALE_MODES = ("frozen", "learned")
PLACEMENTS, INTERFACES = ("graph", "double"), ("symbols", "latent")
PRECISIONS = ("w8a8", "a16w8")  # src.quant.scheme.PROFILES
DEFAULT_PRECISION, DEFAULT_SCALES = "w8a8", "learned"  # learned: measured better (docs/qat_study.md)
LOG_SCALE_GAIN = 30.0  # learned scales: relative step per optimizer step ~ LOG_SCALE_GAIN * lr (LearnedFakeQuantize)


# The fields of a QAT scheme that decide the network (the others are prose). "learned_scales" says how a stored
# log_scale reads (the gain), so it is one of them.
SCHEME_FIELDS = ("parts", "precision", "scales", "placement", "interface", "learned_scales")


def qat_scheme(precision: str = DEFAULT_PRECISION, scales: str = DEFAULT_SCALES, placement: str = "graph",
               interface: str = "symbols") -> Dict[str, Any]:
    """The QAT part of an architecture description (what ``prepare_qat`` builds).

    ``placement`` and ``interface`` exist for the study's ablation of the
    QAT this project had before: ``double`` also rounds each convolution's
    output before its ReLU6 (the graph rounds once, after it), ``latent``
    also puts g_a's output on an 8-bit grid (the graph hands over the
    symbols at scale 1). Neither is what the exported graph computes.
    """
    if placement not in PLACEMENTS or interface not in INTERFACES:
        raise ValueError(f"QAT placement/interface must be in {PLACEMENTS}/{INTERFACES}, got {placement}/{interface}")
    if precision not in PRECISIONS:
        raise ValueError(f"QAT precision must be one of {PRECISIONS}, got {precision!r}")
    if scales not in SCALE_MODES:
        raise ValueError(f"QAT scales must be one of {SCALE_MODES}, got {scales!r}")
    return {"parts": list(QAT_PARTS), "weights": "int8 per-channel symmetric [-127, 127] (absmax, as onnxruntime)",
            "activations": "the exported graph's quantised tensors (src.quant.ptq symbol interface)",
            "precision": precision, "scales": scales, "placement": placement, "interface": interface,
            "learned_scales": f"log space, relative step ~{LOG_SCALE_GAIN:g} x lr"}


def normalise_scheme(qat: Any) -> Optional[Dict[str, Any]]:
    """None, or the full scheme for True / a stored scheme; ValueError for anything else.

    A stored scheme is matched on what builds the network (``SCHEME_FIELDS``);
    its prose ("weights", "activations") is for a reader and takes today's
    wording (it named ``src.int8`` before the move to ``src/quant``). Schemes of
    earlier checkpoint formats never get here: ``src.checkpoint_format``
    upgrades them on read (or refuses the first QAT's).
    """
    if not qat:
        return None
    if qat is True:
        return qat_scheme()
    if not isinstance(qat, Mapping) or "precision" not in qat or "scales" not in qat:
        raise ValueError(f"qat must be None or a scheme of src.quant.scheme.qat_scheme(), got {qat!r}")
    scheme = qat_scheme(qat["precision"], qat["scales"], qat.get("placement", "graph"), qat.get("interface", "symbols"))
    if set(qat) != set(scheme) or any(qat[key] != scheme[key] for key in SCHEME_FIELDS):
        raise ValueError(f"qat must be None or {scheme}, got {dict(qat)!r}")
    return scheme


def qat_arch(args: Any) -> Optional[Dict[str, Any]]:
    """The scheme the flags ask for (None without ``--qat``)."""
    return qat_scheme(args.qat_precision, args.qat_scales, args.qat_placement, args.qat_interface) if args.qat else None
