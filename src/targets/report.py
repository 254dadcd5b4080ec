"""The per-target report (Markdown beside report.json) and the table over models x targets x precisions."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from src.rd_curves import MIN_POINTS, QUALITY_AXES, bd_deltas, msssim_db

PARTS = ("encoder", "decoder")


def fallbacks_text(part: Dict) -> str:
    if not part["fallbacks"]:
        return "none"
    return "; ".join(f"{f['op']} `{f['name']}`: {f['reason']}" for f in part["fallbacks"])


def latency_text(part: Dict) -> str:
    value = part.get("estimates", {}).get("latency_ms")
    return "-" if value is None else f"{value:.1f}"


def point_text(point) -> str:
    if point is None:
        return "-"
    return f"{point['psnr']:.2f} dB / {point['ms_ssim']:.4f} / {point['bpp']:.4f}"


def target_markdown(result: Dict) -> str:
    """One target and precision: ops on the NPU, each fallback with the compiler's reason, its estimates, the round
    trip beside FP32 and the project's ONNX INT8."""
    lines = [f"# {result['model']} on {result['target']} ({result['precision']})", "",
             f"Toolchain: {result['toolchain']['name']} {result['toolchain']['version']}", "",
             *form_lines(result),
             "| part | compiled input | ops on NPU | estimates | fallbacks (compiler's reason) |",
             "| --- | --- | --- | --- | --- |"]
    for name in PARTS:
        part = result["parts"][name]
        est = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k}: {v}"
                        for k, v in sorted(part.get("estimates", {}).items()))
        lines.append(f"| {name} | {'x'.join(map(str, part.get('input_shape', [])))} | "
                     f"{part['ops_npu']} / {part['ops_total']} | {est} | {fallbacks_text(part)} |")
    rt = result["roundtrip"]
    if rt is None:
        lines += ["", "Compiled only (no eval photos): no round trip measured.", ""]
    else:
        lines += round_trip_lines(result)
    for name in PARTS:
        q = result["parts"][name].get("quantisation", {})
        if q:
            lines.append(f"- {name}: carried {'; '.join(q.get('carried', []))}. Lost: {q.get('lost', 'nothing')}.")
    return "\n".join(lines) + "\n"


def form_lines(result: Dict) -> List[str]:
    """The graph form and range method the target was given (reports written before they were recorded: none)."""
    form = result.get("form")
    if not form:
        return []
    lines = [f"Graph form: ECA's mean {form['eca_mean']} (src.targets.rewrites.ECA_MEANS); activation ranges: "
             f"{form['range_method']}"]
    qat = form.get("qat_ranges")
    if isinstance(qat, dict):
        lines.append("QAT scales carried by ONNX name: " + "; ".join(
            f"{part} {entry['qat_scales']} tensors (the {form['range_method']} rule for the "
            f"{len(entry['ptq_ranges'])} tensors of the target form with no QAT site)" for part, entry in qat.items()))
    elif qat:
        lines.append(f"QAT scales {qat}")
    return lines + [""]


def round_trip_lines(result: Dict) -> List[str]:
    rt = result["roundtrip"]
    return ["", f"Round trip on {rt['eval_images']} held-out photos (whole, padded to 64; real bits; "
                "PSNR / MS-SSIM / bpp):", "",
            "| codec | PSNR / MS-SSIM / bpp |", "| --- | --- |",
            f"| FP32 graphs | {point_text(rt['fp32'])} |",
            f"| project's {rt['project_int8']['source']} | {point_text(rt['project_int8'])} |",
            f"| {result['target']} {result['precision']} | {point_text(rt['target'])} |", "",
            f"Target encoder's symbols: integer {rt['symbols']['integer']}, range "
            f"[{rt['symbols']['min']:.0f}, {rt['symbols']['max']:.0f}], outside int8 {rt['symbols']['outside_int8']}.",
            ""]


def summary_row(result: Dict) -> Dict:
    enc, dec = (result["parts"][p] for p in PARTS)
    rt = result["roundtrip"] or {"target": None, "fp32": None, "project_int8": None, "symbols": {"integer": None}}
    return {"model": result["model"], "target": result["target"], "precision": result["precision"],
            "encoder_npu": [enc["ops_npu"], enc["ops_total"]], "decoder_npu": [dec["ops_npu"], dec["ops_total"]],
            "fallbacks": [f"{p}: {f['op']} ({f['reason']})" for p in PARTS for f in result["parts"][p]["fallbacks"]],
            "encoder_ms": enc.get("estimates", {}).get("latency_ms"),
            "decoder_ms": dec.get("estimates", {}).get("latency_ms"),
            "input_shape": enc.get("input_shape"),
            "target_point": rt["target"], "fp32": rt["fp32"], "project_int8": rt["project_int8"],
            "symbols_integer": rt["symbols"]["integer"],
            "curve": result.get("curve"), "rate_point": result.get("rate_point"), "upsample": result.get("upsample")}


def refused_row(model: str, target: str, precision: str, reason: str, ident: Dict) -> Dict:
    """A summary row for a target and precision whose converter or compiler refused the model (``reason``: its
    one line), recorded under ``--allow_fallbacks true`` as a result like a fallback."""
    return {"model": model, "target": target, "precision": precision, "encoder_npu": None, "decoder_npu": None,
            "fallbacks": [], "refused": reason, "encoder_ms": None, "decoder_ms": None, "input_shape": None,
            "target_point": None, "fp32": None, "project_int8": None, "symbols_integer": None,
            **{k: ident.get(k) for k in ("curve", "rate_point", "upsample")}}


def fallback_counts(fallbacks: Sequence[str]) -> str:
    """'decoder: 3x SQRT, 3x QUANTIZE, ...' from the rows' fallback lines (each reason is in report.md)."""
    if not fallbacks:
        return "none"
    counts: Dict[str, int] = {}
    for line in fallbacks:
        key = line.split(" (", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n}x {key}" for key, n in counts.items())


def summary_markdown(rows: Sequence[Dict]) -> str:
    """The thesis table: per model x target x precision, ops on the NPU, fallbacks, latency, rate and quality."""
    lines = ["| model | target | precision | encoder ops on NPU | decoder ops on NPU | fallbacks | enc / dec ms "
             "(Vela/toolkit) | target PSNR / MS-SSIM / bpp | project ONNX INT8 | FP32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ms = "/".join("-" if v is None else f"{v:.1f}" for v in (r["encoder_ms"], r["decoder_ms"]))
        fall = f"refused: {r['refused']}" if r.get("refused") else fallback_counts(r["fallbacks"])
        enc, dec = ("-" if r[k] is None else f"{r[k][0]}/{r[k][1]}" for k in ("encoder_npu", "decoder_npu"))
        lines.append(f"| {r['model']} | {r['target']} | {r['precision']} | {enc} "
                     f"| {dec} | {fall} | {ms} | "
                     f"{point_text(r['target_point'])} | {point_text(r['project_int8'])} | {point_text(r['fp32'])} |")
    return "\n".join(lines) + "\n"


def merged_rows(earlier: Sequence[Dict], new: Sequence[Dict]) -> List[Dict]:
    """``earlier`` rows with those of the same model, target and precision replaced by ``new`` (kept in order)."""
    def ident(row):
        return row["model"], row["target"], row["precision"]
    fresh = {ident(r): r for r in new}
    kept = [fresh.pop(ident(r), r) for r in earlier]
    return kept + [r for r in new if ident(r) in fresh]


# ---------------------------------------------------------------- rate points of one model: BD-rate on each target

CODECS = ("target_point", "project_int8")  # each compared with the FP32 graphs of its own rate points


def curve_groups(rows: Sequence[Dict]) -> Dict[Tuple[str, str, str, str], List[Dict]]:
    """Rows of ``--curve`` models with a round trip, by (curve, upsample, target, precision), in rate-point order."""
    groups: Dict[Tuple[str, str, str, str], List[Dict]] = {}
    for row in rows:
        if row.get("curve") and row["target_point"] is not None:
            groups.setdefault((row["curve"], row["upsample"], row["target"], row["precision"]), []).append(row)
    return {k: sorted(v, key=lambda r: r["rate_point"]) for k, v in groups.items()}


def _points(rows: Sequence[Dict], codec: str) -> List[Dict]:
    return [{**r[codec], "ms_ssim_db": msssim_db(r[codec]["ms_ssim"])} for r in rows]


def curve_deltas(rows: Sequence[Dict]) -> List[Dict]:
    """Per curve, upsampling, target and precision: the BD figures of the target's quantised codec and of the
    project's own ONNX INT8 (same profile, same rate points) against the FP32 graphs, on PSNR and MS-SSIM (dB);
    and, per target and precision, each curve's target codec against the first curve's (the GDN control when it
    is named first), so what a swap costs *on that NPU* is one number.

    ``within_project`` says whether the target's BD-rate cost is at most the project's ONNX INT8 cost (PSNR);
    ``None`` where either delta could not be computed (``notes`` say why).
    """
    groups = curve_groups(rows)
    out = []
    for (curve, upsample, target, precision), members in groups.items():
        fp32 = _points(members, "fp32")
        entry = {"curve": curve, "upsample": upsample, "target": target, "precision": precision,
                 "points": len(members), "vs_fp32": {}}
        for codec in CODECS:
            entry["vs_fp32"][codec] = {axis: bd_deltas(fp32, _points(members, codec), axis, "fp32", codec)
                                       for axis in QUALITY_AXES}
        t, p = (entry["vs_fp32"][c]["psnr"]["bd_rate"] for c in CODECS)
        entry["within_project"] = None if t is None or p is None else bool(t <= p + 1e-9)
        out.append(entry)
    anchors: Dict[Tuple[str, str], Tuple[str, List[Dict]]] = {}
    for (curve, upsample, target, precision), members in groups.items():
        anchors.setdefault((target, precision), (f"{curve}_{upsample}", members))
    for entry in out:
        name, members = anchors[(entry["target"], entry["precision"])]
        own = groups[(entry["curve"], entry["upsample"], entry["target"], entry["precision"])]
        entry["vs_anchor"] = {"anchor": name, **{axis: bd_deltas(_points(members, "target_point"),
                                                                  _points(own, "target_point"), axis, name,
                                                                  entry["curve"]) for axis in QUALITY_AXES}}
    return out


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:+.2f} %"


def curves_markdown(deltas: Sequence[Dict]) -> str:
    """The BD table: target vs FP32 beside the project's ONNX INT8 vs FP32, and each curve vs the first on the
    same target (all on the target's quantised codec, real bits), with the reasons for any n/a."""
    lines = ["| curve | decoder | target | precision | points | BD-rate target vs FP32 (PSNR / MS-SSIM) | "
             "BD-rate project ONNX INT8 vs FP32 (PSNR / MS-SSIM) | target cost <= project's | BD-rate vs first "
             "curve on this target (PSNR / MS-SSIM) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for d in deltas:
        t, p, a = d["vs_fp32"]["target_point"], d["vs_fp32"]["project_int8"], d["vs_anchor"]
        verdict = {None: "n/a", True: "yes", False: "no"}[d["within_project"]]
        anchor = "(anchor)" if a["anchor"] == f"{d['curve']}_{d['upsample']}" else (
            f"{_pct(a['psnr']['bd_rate'])} / {_pct(a['ms_ssim_db']['bd_rate'])} vs {a['anchor']}")
        lines.append(f"| {d['curve']} | {d['upsample']} | {d['target']} | {d['precision']} | {d['points']} | "
                     f"{_pct(t['psnr']['bd_rate'])} / {_pct(t['ms_ssim_db']['bd_rate'])} | "
                     f"{_pct(p['psnr']['bd_rate'])} / {_pct(p['ms_ssim_db']['bd_rate'])} | {verdict} | {anchor} |")
        for what, by_axis in (("target vs fp32", t), ("project int8 vs fp32", p)):
            notes += [f"- {d['curve']} {d['target']} {d['precision']}, {what}, {axis}: {note}"
                      for axis, delta in by_axis.items() for note in delta["notes"]]
    if not deltas:
        lines.append(f"| (no curve with round trips: --curve needs eval photos and {MIN_POINTS} rate points) "
                     "| | | | | | | | |")
    return "\n".join(lines + ([""] + sorted(set(notes), key=notes.index) if notes else [])) + "\n"
