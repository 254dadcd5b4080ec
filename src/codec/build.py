"""Write a codec bundle (``src.codec.bundle``) from a model: symbol graphs, entropy tables, verified round trip, op audit.

``scripts.export_onnx --bundle DIR`` calls ``write_bundle``. The graphs are
the symbol interface of ``src.quant.ptq`` (``symbol_graphs``: the encoder ends with
Round, the decoder adds the medians), with dynamic H/W; the decoder's stride-2
ConvTransposes become sub-pixel convolutions with ``upsample="subpixel"``
(``src.codec.subpixel``). INT8 bundles quantise those FP32 graphs with ``src.quant.ptq``'s
profiles (``int8_symbol_pair``). Before
the manifest is written the bundle codes its verification images (whole,
any size) on both runtimes, and each graph's executed ops are audited on both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from src.checkpoint import swap_in_folder
from src.cli import UserError
from src.codec.bundle import (BUNDLE_FORMAT, BUNDLE_VERSION, GRAPH_FILES, MANIFEST, TABLES_FILE, Bundle, Codec,
                              file_sha256, image_array, load_bundle, padded_input)
from src.codec.format import FORMAT_VERSION, HEADER, LATENT_STRIDE, MAGIC, PAD_MULTIPLE
from src.codec.roundtrip import bitstream_roundtrip
from src.codec.runtimes import RUNTIMES, audit_line, load_graph, runtime_audit
from src.codec.subpixel import UPSAMPLE_MODES, subpixel_rewrite
from src.codec.tables import EntropyTables
from src.images import image_tensor, load_rgb
from src.losses import quantised_metrics
from src.quant.fake_quant import activation_precision as qat_model_precision, float_twin, is_qat_model
from src.quant.onnx_export import MAX_ABS_ERROR, NPU_FORBIDDEN_OPS, op_histogram
from src.quant.ptq import calibrate, quantise_pair
from src.quant.qat import export_pair
from src.quant.scheme import DEFAULT_RANGE_METHOD, PROFILES as INT8_PROFILES
from src.quant.symbols import symbol_graphs

PROFILES = ("fp32", *sorted(INT8_PROFILES))
# Export check of the rounded encoder: a symbol may differ from PyTorch's only where PyTorch's centred
# latent lies this close to a rounding boundary (FP32 sums in another order move it by ~1e-6).
BOUNDARY_TOLERANCE = 1e-3


def int8_symbol_pair(fp32: Dict[str, Path], calibration_images: Sequence[np.ndarray], profile: str,
                     range_method: str, out_dir: Path) -> Dict[str, Any]:
    """INT8 encoder and decoder of the symbol interface (``src.quant.ptq``), calibrated on whole images.

    ``fp32`` is ``src.quant.symbols.symbol_graphs``' dict; returns the paths and what
    the pair was quantised with (for the manifest).
    """
    pair = quantise_pair(calibrate(fp32, calibration_images, out_dir), profile, range_method, out_dir / "int8")
    return {"encoder": pair.encoder, "decoder": pair.decoder,
            "precision": {"profile": profile, "description": INT8_PROFILES[profile], "range_method": range_method,
                          "sixteen_bit": pair.sixteen_bit, "symbol_bits": pair.symbol_bits,
                          "symbols_outside_int8_calibration": pair.symbols_outside_int8,
                          "float_islands": pair.float_islands}}


def qat_symbol_pair(qat_model: nn.Module, images: Sequence[np.ndarray], out_dir: Path, opset: int) -> Dict[str, Any]:
    """A QAT model's INT8 symbol pair with its own scales (``src.quant.qat.export_pair``), as ``int8_symbol_pair``."""
    pair = export_pair(qat_model, images, out_dir, opset)
    return {"encoder": pair.encoder, "decoder": pair.decoder,
            "precision": {"profile": pair.precision, "description": INT8_PROFILES[pair.precision],
                          "scales": "QAT checkpoint's own (no calibration)", "symbol_bits": pair.symbol_bits,
                          "symbols_outside_int8_verification": pair.symbols_outside_int8,
                          "float_islands": pair.float_islands}}


def check_factorized(model: nn.Module) -> None:
    if not hasattr(model, "entropy_bottleneck") or hasattr(model, "gaussian_conditional"):
        raise UserError("a codec bundle holds a factorized-prior model (bmshj2018-factorized); this checkpoint "
                        f"is a {type(model).__name__}")


@torch.no_grad()
def check_export(model: nn.Module, paths: Dict[str, Path], image: torch.Tensor) -> Dict:
    """The FP32 symbol graphs against the PyTorch model itself (ConvTranspose and HardSigmoid as trained).

    Symbols must be PyTorch's ``round(g_a(x) - median)`` except where that
    value lies within ``BOUNDARY_TOLERANCE`` of a rounding boundary; the
    decoder's image must be ``g_s(symbols + median)`` within ``MAX_ABS_ERROR``.
    """
    medians = model.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
    centred = (model.g_a(image) - medians).numpy()
    reference = np.round(centred).astype(np.float32)
    got = load_graph(paths["encoder"], "onnxruntime")(image.numpy())
    differ = got != reference
    near_boundary = np.abs(np.abs(centred - np.floor(centred)) - 0.5) < BOUNDARY_TOLERANCE
    if np.any(np.abs(got - reference) > 1) or np.any(differ & ~near_boundary):
        raise UserError(f"export mismatch: {int(differ.sum())} symbols differ from PyTorch away from a rounding "
                        "boundary")
    x_hat = load_graph(paths["decoder"], "onnxruntime")(reference)
    error = float(np.abs(x_hat - model.g_s(torch.from_numpy(reference) + medians).numpy()).max())
    if not error <= MAX_ABS_ERROR:
        raise UserError(f"export mismatch: decoder max abs error {error:.2e} > {MAX_ABS_ERROR:g}")
    return {"symbols_differing": int(differ.sum()), "symbols": int(differ.size), "decoder_max_abs_error": error}


def verify_round_trip(bundle: Bundle, images: Sequence[Path], model: nn.Module) -> Dict[str, Any]:
    """Code each verification image whole on both runtimes; PSNR, MS-SSIM, bpp and how the runtimes agree.

    ``pytorch_bpp``: the bits ``src.eval`` counts for the same image with the PyTorch model (``compress``).
    """
    result: Dict[str, Any] = {"images": [str(p) for p in images]}
    per_runtime = {}
    for runtime in RUNTIMES:
        coder = Codec(bundle, runtime)
        rows = []
        for path in images:
            image = image_array(path)
            data, symbols = coder.encode(image, str(path), return_symbols=True)
            decoded = coder.decode(data, str(path))
            x, x_hat = (torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in (image, decoded))
            metrics = quantised_metrics(x, x_hat)
            pixels = image.shape[0] * image.shape[1]
            rows.append({"psnr": metrics["psnr"], "ms_ssim": metrics["ms_ssim"],
                         "bpp": 8 * (len(data) - HEADER.size) / pixels, "bpp_file": 8 * len(data) / pixels,
                         "symbols": symbols, "decoded": decoded})
        per_runtime[runtime] = rows
        result[runtime] = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ms_ssim", "bpp", "bpp_file")}
    ort_rows, ov_rows = per_runtime["onnxruntime"], per_runtime["openvino"]
    result["runtime_agreement"] = {
        "symbols_differing": int(sum(np.count_nonzero(a["symbols"] != b["symbols"])
                                     for a, b in zip(ort_rows, ov_rows))),
        "symbols": int(sum(a["symbols"].size for a in ort_rows)),
        "max_pixel_difference": int(max(np.abs(a["decoded"].astype(int) - b["decoded"].astype(int)).max()
                                        for a, b in zip(ort_rows, ov_rows))),
        "psnr_difference": result["openvino"]["psnr"] - result["onnxruntime"]["psnr"],
        "bpp_ratio": result["openvino"]["bpp"] / result["onnxruntime"]["bpp"] - 1,
    }
    bits = [bitstream_roundtrip(model, image_tensor(load_rgb(p)))["bits"] for p in images]
    pixels = [np.prod(image_array(p).shape[:2]) for p in images]
    result["pytorch_bpp"] = float(np.mean([b / n for b, n in zip(bits, pixels)]))
    return result


def audit(paths: Dict[str, Path]) -> Dict[str, Any]:
    """Ops integer NPUs cannot run (in the ONNX graphs), and what each runtime executes, in which precision."""
    return {part: {"npu_forbidden_ops": sorted(op for op in op_histogram(path) if op in NPU_FORBIDDEN_OPS),
                   **{runtime: runtime_audit(path, runtime) for runtime in RUNTIMES}}
            for part, path in paths.items()}


BUNDLE_FILES = frozenset([MANIFEST, TABLES_FILE, *GRAPH_FILES.values()])


def check_target(target: Path) -> None:
    """A bundle may replace an empty folder or a bundle of this codec that holds nothing else, and nothing more.

    "A bundle" is proved, not guessed from a file name: its manifest names
    this format and the sha256 of its tables and graphs check out
    (``load_bundle``). A folder that merely holds a ``manifest.json``
    (``scripts.coco_prepare``'s output has one) is the user's, and kept.
    """
    target = Path(target)
    if not target.exists():
        if target.is_symlink():
            raise UserError(f"--bundle {target} is a dangling link: not writing through it")
        return
    if not target.is_dir():
        raise UserError(f"--bundle {target} exists and is not a folder: not overwriting it")
    names = {p.name for p in target.iterdir()}
    if not names:
        return
    try:
        load_bundle(target)
    except UserError as err:
        raise UserError(f"--bundle {target} exists and is not a codec bundle: not overwriting it ({err})") from None
    if names - BUNDLE_FILES:
        extra = ", ".join(sorted(names - BUNDLE_FILES)[:3])
        raise UserError(f"--bundle {target} is a codec bundle that also holds other files ({extra}): not "
                        "overwriting it; move them or choose another folder")


def remove_stale_builds(target: Path) -> None:
    """Delete build folders of ``target`` left by an export that was killed (its pid in the name is gone)."""
    for stale in target.parent.glob(f".{target.name}.build.*"):
        match = re.fullmatch(rf"\.{re.escape(target.name)}\.build\.(\d+)\..*", stale.name)
        if match and stale.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
            print(f"removed {stale}, left by an export that was killed")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_folder(built: Path, target: Path) -> None:
    """Put the finished bundle ``built`` at ``target``; an earlier bundle there is replaced, anything else kept."""
    check_target(target)
    swap_in_folder(built, target)


def write_bundle(model: nn.Module, arch: Optional[Dict], out: Path, verification: Sequence[Path],
                 calibration: Sequence[np.ndarray] = (), profile: str = "fp32", upsample: str = "convtranspose",
                 opset: int = 13, source: str = "", calibration_from: str = "",
                 range_method: str = DEFAULT_RANGE_METHOD) -> Dict[str, Any]:
    """Write the bundle at ``out`` and return its manifest.

    ``profile``: fp32, or an INT8 profile of ``src.quant.ptq`` (w8a8, a16w8): the
    FP32 symbol graphs quantised by ``int8_symbol_pair``, calibrated on
    ``calibration``, whole images as (1, 3, H, W) arrays padded to 64.
    A QAT checkpoint bundles its float weights (fp32) or, with its own
    profile, the INT8 pair of ``src.quant.qat.export_pair`` (PTQ's graphs with its
    weights and scales; nothing is calibrated).
    """
    check_factorized(model)
    check_target(Path(out))
    if upsample not in UPSAMPLE_MODES:
        raise UserError(f"--upsample must be one of {UPSAMPLE_MODES}")
    qat_model = model if is_qat_model(model) else None
    if qat_model is not None:
        trained = qat_model_precision(qat_model)
        if profile not in ("fp32", trained):
            raise UserError(f"this QAT checkpoint was trained for {trained}: bundle it with --precision {trained} "
                            f"(its own scales) or without --int8 (its float weights)")
        if profile != "fp32" and upsample != "convtranspose":
            raise UserError("a QAT checkpoint's INT8 bundle keeps the ConvTransposes it was trained with: "
                            "drop --upsample subpixel")
        model = float_twin(qat_model)
    if profile not in PROFILES:
        raise UserError(f"precision profile must be one of {PROFILES}, got {profile!r}")
    if profile != "fp32" and not calibration and qat_model is None:
        raise UserError(f"the {profile} bundle needs calibration images (--int8 CALIB_DIR)")
    if not verification:
        raise UserError("a bundle needs at least one verification image")
    model = model.eval()
    eb = model.entropy_bottleneck
    if eb._quantized_cdf.numel() == 0:
        print("note: the checkpoint has no entropy tables (saved without model.update()); building them now")
        model.update(force=True)
    tables = EntropyTables.from_entropy_bottleneck(eb)
    coded = nn.Module()  # what the graphs are made of: g_a, g_s (maybe rewritten) and the medians
    coded.g_a, coded.g_s, coded.entropy_bottleneck = model.g_a, model.g_s, eb
    if upsample == "subpixel":
        coded.g_s, count = subpixel_rewrite(model.g_s)
        if not count:
            raise UserError("--upsample subpixel: the decoder has no stride-s ConvTranspose2d to rewrite")
        print(f"sub-pixel rewrite: {count} ConvTranspose2d -> Conv2d + DepthToSpace")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.build.{os.getpid()}.") as tmp:
        tmp = Path(tmp)
        folder = tmp / "bundle"
        folder.mkdir()
        example = torch.from_numpy(padded_input(image_array(verification[0])))
        fp32 = symbol_graphs(coded, example, tmp / "fp32", opset)
        for path in fp32.values():
            onnx.checker.check_model(onnx.load(str(path)))
        checked = check_export(model, fp32, example)
        precision: Dict[str, Any] = {"profile": profile}
        graphs = {part: fp32[part] for part in GRAPH_FILES}
        if profile != "fp32" and qat_model is not None:
            images = list(calibration) or [padded_input(image_array(f)) for f in verification]
            pair = qat_symbol_pair(qat_model, images, tmp / "qat", opset)
            graphs = {part: pair[part] for part in GRAPH_FILES}
            precision = pair["precision"]
        elif profile != "fp32":
            pair = int8_symbol_pair(fp32, calibration, profile, range_method, tmp)
            graphs = {part: pair[part] for part in GRAPH_FILES}
            precision = dict(pair["precision"], calibration_images=len(calibration),
                             calibration_from=calibration_from)
        for part, path in graphs.items():
            shutil.copyfile(path, folder / GRAPH_FILES[part])
        tables.save(folder / TABLES_FILE)
        manifest = {
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "source": source, "arch": arch,
            "base_model": (arch or {}).get("base_model", "bmshj2018-factorized"),
            "quality": (arch or {}).get("quality"), "latent_channels": tables.channels,
            "latent_stride": LATENT_STRIDE, "pad_multiple": PAD_MULTIPLE, "precision": precision,
            "upsample": upsample, "opset": opset,
            "file_format": {"magic": MAGIC.decode(), "version": FORMAT_VERSION,
                            "header_bytes": HEADER.size},
            "entropy": {"file": TABLES_FILE, "sha256": tables.digest()},
            "graphs": {part: {"file": GRAPH_FILES[part],
                              "sha256": file_sha256(folder / GRAPH_FILES[part]),
                              "input": "x" if part == "encoder" else "symbols",
                              "output": "symbols" if part == "encoder" else "x_hat",
                              "ops": op_histogram(folder / GRAPH_FILES[part])} for part in GRAPH_FILES},
            "export_check": checked,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        bundle = load_bundle(folder)
        manifest["verification"] = verify_round_trip(bundle, verification, model)
        manifest["audit"] = audit({part: folder / name for part, name in GRAPH_FILES.items()})
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_folder(folder, out)
    print_summary(manifest, out)
    return manifest


def print_summary(manifest: Dict[str, Any], out: Path) -> None:
    v = manifest["verification"]
    print(f"bundle -> {out} ({manifest['precision']['profile']}, upsample {manifest['upsample']}, "
          f"M={manifest['latent_channels']}, tables {manifest['entropy']['sha256'][:12]})")
    for runtime in RUNTIMES:
        r = v[runtime]
        print(f"round trip on {len(v['images'])} verification image(s), {runtime}: {r['psnr']:.3f} dB, "
              f"MS-SSIM {r['ms_ssim']:.4f}, {r['bpp']:.4f} bpp (file with header {r['bpp_file']:.4f})")
    agree = v["runtime_agreement"]
    print(f"onnxruntime vs openvino: {agree['symbols_differing']} of {agree['symbols']} symbols differ, decoded "
          f"pixels within {agree['max_pixel_difference']} levels, PSNR {agree['psnr_difference']:+.4f} dB; "
          f"PyTorch compress: {v['pytorch_bpp']:.4f} bpp")
    for part, found in manifest["audit"].items():
        for runtime in RUNTIMES:
            print(f"audit {part} {runtime}: {audit_line(found[runtime])}")
        if found["npu_forbidden_ops"]:
            print(f"audit {part}: ops integer NPUs cannot run: {', '.join(found['npu_forbidden_ops'])}")
