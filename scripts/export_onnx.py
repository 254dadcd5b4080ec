"""Export a checkpoint to ONNX and verify the export before returning.

    python -m scripts.export_onnx --ckpt checkpoints/last.pt --part encoder --out onnx/enc.onnx --input_size 224

Parts: ``encoder`` (g_a: image -> latent y), ``decoder`` (g_s: y_hat -> image;
latent channels M and latent size input_size / stride are read from the model),
``full`` (forward pass: reconstruction and likelihoods). Every export is
checked with ``onnx.checker``, run in onnxruntime against PyTorch on a real
image crop (max abs error above 1e-3 fails), and its op histogram is printed.
For the NPU variant the encoder/decoder graphs must not contain Div, Sqrt,
Pow, Exp, Log, Sigmoid, Tanh, Erf or Softplus, or the command fails.

A QAT checkpoint (``--qat true``): OUT is its float weights' graph (checked
like any other), and ``--int8`` writes OUT.int8.onnx through the PTQ
pipeline below with the checkpoint's own activation scales passed to
``quantize_static`` (``src.quant.qat.export_pair``): no calibration happens here.

``--int8`` reports the encoder -> entropy coder -> decoder round trip of the
INT8 graphs against the FP32 ones, in PSNR and in real bits, on images that
were not used for calibration. For a float checkpoint this is PTQ
(``src.quant.ptq``): symbol-interface graphs (the INT8 encoder outputs the entropy
coder's symbols ``round(y - median)``, the INT8 decoder takes them and adds
the medians itself), calibrated on the whole CALIB_DIR images, with the
``--precision`` profile (``w8a8`` or ``a16w8``) and ranges chosen by
``--calib_method``; OUT.int8.onnx is the INT8 graph of ``--part`` on that
interface. For a QAT checkpoint, that INT8 pair with its own scales against
its float weights. With ``--dynamic`` the round trip codes the
images whole (padded to 64 like ``src.eval``), else their centre crops at
``--input_size``. ``--int8_sensitivity`` adds, per activation tensor, what
16 bits on that tensor alone would buy.

``--bundle DIR`` writes a codec bundle instead of one graph (``src.codec.build``,
``src.codec.bundle``; decode with ``python -m scripts.codec``): the symbol encoder
and decoder (dynamic H/W), the entropy tables and a manifest with the
round trip measured on the verification images (``--image``, or with
``--int8`` the held-out images) on onnxruntime and OpenVINO. FP32, or with
``--int8 CALIB_DIR`` INT8 graphs of ``--precision`` calibrated there.
``--upsample subpixel`` rewrites the decoder's stride-2 ConvTransposes as
Conv + DepthToSpace.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import onnx
import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors
import torch
from torch import nn
from torch.onnx import _constants as onnx_constants

from src.checkpoint import current_umask
from src.codec.limits import MAX_PIXELS
from src.cli import UserError, run_cli
from src.codec.build import check_target, write_bundle
from src.codec.subpixel import UPSAMPLE_MODES
from src.data import image_files
from src.images import DECODE_ERRORS, center_crop_tensor, decode_reason, image_tensor, load_rgb
from src.model_factory import load_checkpoint_model, make_arch
from src.outputs import check_output_file
from src.quant.fake_quant import float_twin, is_qat_model
from src.quant.onnx_export import (MAX_ABS_ERROR, NPU_FORBIDDEN_OPS, export_graph, int8_report, op_histogram,
                                   output_errors, part_input)
from src.quant.ptq import pad_to
from src.quant.scheme import DEFAULT_PROFILE, DEFAULT_RANGE_METHOD, PROFILES, RANGE_METHODS
from src.replace_gdn import REPLACE_MODES, replace_gdn_with_relu


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX, verified against PyTorch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of this project, or a plain CompressAI state dict")
    p.add_argument("--part", default="full", choices=("full", "encoder", "decoder"))
    p.add_argument("--out", default=None, help="output .onnx path (required unless --bundle)")
    p.add_argument("--input_size", type=int, default=224, help="image side the graph is traced at")
    p.add_argument("--dynamic", action="store_true", help="dynamic H/W axes (also verified at a second size)")
    p.add_argument("--opset", type=int, default=13)
    p.add_argument("--replace_parts", default=None, choices=sorted(REPLACE_MODES),
                   help="apply GDN->ReLU to a checkpoint without replacement (e.g. a zoo state dict)")
    p.add_argument("--image", default=None, help="real image for verification (default: first val image of the run)")
    p.add_argument("--int8", default=None, metavar="CALIB_DIR",
                   help="also write a static INT8 model (OUT with .int8.onnx), calibrated on images in CALIB_DIR, "
                        "and report PSNR and real bpp of the INT8 encoder->entropy coder->decoder round trip "
                        "against FP32 on other images; a QAT checkpoint's OUT is already INT8 (learned scales): "
                        "it is not calibrated again and CALIB_DIR's images serve the round trip")
    p.add_argument("--calib_count", type=int, default=32, help="calibration images used from CALIB_DIR")
    p.add_argument("--int8_eval_dir", default=None,
                   help="held-out images for the FP32-vs-INT8 round trip (default: CALIB_DIR's images after the "
                        "calibration ones; the report is never measured on the calibration images)")
    p.add_argument("--int8_eval_count", type=int, default=16, help="round-trip images used")
    p.add_argument("--precision", default=DEFAULT_PROFILE, choices=sorted(PROFILES),
                   help="INT8 precision profile: " + "; ".join(f"{k} = {v}" for k, v in PROFILES.items()))
    p.add_argument("--calib_method", default=DEFAULT_RANGE_METHOD, choices=RANGE_METHODS,
                   help="how each activation's range is chosen from the calibration histograms: mse = the range "
                        "with the least quantisation error for its bit-width; minmax = the extremes; percentile = "
                        "0.01 %% clipped on each side")
    p.add_argument("--int8_sensitivity", action="store_true",
                   help="also measure, for each activation tensor alone at 16 bits, the round trip's PSNR and rate "
                        "change (one quantisation and round trip per tensor: slow; use few --int8_eval_count images)")
    g = p.add_argument_group("Codec bundle")
    g.add_argument("--bundle", default=None, metavar="DIR",
                   help="write a codec bundle (encoder, decoder, entropy tables, manifest) to DIR instead of --out; "
                        "INT8 (--precision) with --int8 CALIB_DIR")
    g.add_argument("--upsample", default="convtranspose", choices=UPSAMPLE_MODES,
                   help="decoder upsampling in the bundle: ConvTranspose as trained, or its exact sub-pixel rewrite")
    return p


# What exporting or checking a graph raises when this torch, onnx or onnxruntime cannot make or run it at an opset.
EXPORT_FAILURES = (torch.onnx.errors.OnnxExporterError, onnx.checker.ValidationError, ort_errors.Fail,
                   ort_errors.InvalidGraph, ort_errors.InvalidArgument, ort_errors.NotImplemented,
                   ort_errors.RuntimeException)


# Per-channel QDQ (the axis attribute of QuantizeLinear/DequantizeLinear) came with opset 13.
INT8_MIN_OPSET = 13


def opset_range() -> Tuple[int, int]:
    """The opsets this torch's TorchScript exporter (``dynamo=False``, as ``export_graph`` uses) targets."""
    high = getattr(onnx_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", onnx_constants.ONNX_MAX_OPSET)
    return onnx_constants.ONNX_MIN_OPSET, high


def check_arguments(args: argparse.Namespace) -> Path:
    """One line for a flag that cannot work, before any model is loaded; returns --out."""
    low, high = opset_range()
    if not low <= args.opset <= high:
        raise UserError(f"--opset {args.opset} is outside {low}..{high}, the opsets the TorchScript exporter of "
                        f"torch {torch.__version__} supports (default 13)")
    if args.int8 and args.opset < INT8_MIN_OPSET:
        raise UserError(f"--int8 needs --opset {INT8_MIN_OPSET} or later: its per-channel weights are "
                        f"QuantizeLinear/DequantizeLinear with an axis, which opset {args.opset} lacks")
    if args.input_size <= 0:
        raise UserError(f"--input_size {args.input_size} must be a positive multiple of the model's stride 16")
    if args.input_size ** 2 > MAX_PIXELS:
        raise UserError(f"--input_size {args.input_size}: a {args.input_size}x{args.input_size} trace is more than the "
                        f"{MAX_PIXELS} pixels the codec codes (docs/codec.md, 'Limits'); the graphs with --dynamic "
                        "take any size up to that")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the graph file, e.g. {out / (args.part + '.onnx')}")
    check_output_file(out, "--out", inputs=[Path(p) for p in (args.ckpt, args.image) if p])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: its folder cannot be created ({err.strerror or err})") from None
    return out


def check_counts(args: argparse.Namespace) -> None:
    """Image counts must be positive: a negative one would slice from the end and pick images nobody named."""
    for flag in ("calib_count", "int8_eval_count"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least 1")


@contextlib.contextmanager
def verified_output(out: Path, opset: int) -> Iterator[Path]:
    """A temp file beside ``out`` to export and check; it replaces ``out`` only when the block has passed.

    So an export that fails any check leaves nothing unverified at ``out``,
    and a good graph already there is not destroyed by a failed one.
    """
    kept = f"{out} was left as it was" if out.exists() else f"{out} was not written"
    try:
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"--out {out} cannot be written ({err.strerror or err})") from None
    os.close(fd)
    staged = Path(name)
    try:
        yield staged
        os.chmod(staged, 0o666 & ~current_umask())
        os.replace(staged, out)
    except EXPORT_FAILURES as err:
        reason = (str(err).strip() or type(err).__name__).splitlines()[0].split(" Status Message:")[0]
        reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "onnxruntime: ", reason)[:160]
        raise UserError(f"the opset {opset} export does not verify ({reason}); {kept}") from None
    except UserError as err:
        raise UserError(f"{err}; {kept}") from None
    finally:
        staged.unlink(missing_ok=True)


def decodable(files: List[Path], what: str, source: str) -> List[Path]:
    """The files that decode; each one that does not is skipped on its own warning line, as ``src.eval`` does."""
    kept = []
    for path in files:
        try:
            load_rgb(path)
        except DECODE_ERRORS as err:
            print(f"warning: skipping {path}: cannot be decoded ({decode_reason(err)})")
            continue
        kept.append(path)
    if files and not kept:
        raise UserError(f"none of the {len(files)} {what} images taken from {source} could be decoded")
    return kept


def load_export_model(args: argparse.Namespace) -> Tuple[nn.Module, Optional[Dict], Dict]:
    """(model, arch, checkpoint payload); --replace_parts must agree with the checkpoint."""
    path = Path(args.ckpt)
    model, arch, payload = load_checkpoint_model(path)
    if arch is None:  # a plain CompressAI state dict (zoo .pth.tar)
        if args.replace_parts not in (None, "none"):
            model = replace_gdn_with_relu(model, args.replace_parts)
        return model.eval(), None, payload
    if args.replace_parts is not None and args.replace_parts != arch["replace_parts"] and arch["replace"] != "none":
        raise UserError(f"--replace_parts {args.replace_parts} contradicts {path}, which holds "
                        f"{arch['replace']}/{arch['replace_parts']}")
    if args.replace_parts not in (None, "none") and arch["replace"] == "none":
        model = replace_gdn_with_relu(model, args.replace_parts)
        arch = make_arch(**dict(arch, replace="relu", replace_parts=args.replace_parts))
    return model.eval(), arch, payload


def verification_file(args: argparse.Namespace, payload: Dict) -> Path:
    """--image, else the first val image of the run that wrote the checkpoint."""
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise UserError(f"--image {path} not found")
    else:
        run_args = payload.get("args") or {}
        if not run_args.get("coco_dir"):
            raise UserError("no image to verify the export on: pass --image PATH")
        folder = Path(run_args["coco_dir"]) / ("val" if run_args.get("use_prepared", True) else "val2017")
        if not folder.is_dir():
            raise UserError(f"the training run's val folder {folder} (used to verify the export) is not here; "
                            "pass --image PATH")
        path = image_files(folder, "verification")[0]
    return path


def verification_image(args: argparse.Namespace, payload: Dict, size: Tuple[int, int]) -> torch.Tensor:
    path = verification_file(args, payload)
    try:
        return center_crop_tensor(path, size)
    except DECODE_ERRORS as err:
        raise UserError(f"verification image {path} cannot be decoded ({decode_reason(err)}); "
                        "pass another --image") from None


def split_calibration(args: argparse.Namespace, qat: bool) -> Tuple[List[Path], List[Path], str]:
    """(calibration files, round-trip files, where the latter come from): never the same images.

    MinMax ranges never clip the images they were measured on, so a round
    trip on the calibration images would flatter INT8. A QAT model is not
    calibrated: all of CALIB_DIR (or --int8_eval_dir) serves the round trip.
    """
    files = image_files(Path(args.int8), "calibration")
    if args.int8_eval_dir:
        held_out = image_files(Path(args.int8_eval_dir), "INT8 evaluation")[: args.int8_eval_count]
        return ([] if qat else files[: args.calib_count]), held_out, str(args.int8_eval_dir)
    if qat:
        return [], files[: args.int8_eval_count], str(args.int8)
    if len(files) < 2:
        raise UserError(f"--int8 {args.int8} holds {len(files)} image: calibration and the round trip need "
                        "different images; add images or pass --int8_eval_dir DIR")
    calib = files[: min(args.calib_count, len(files) - max(1, len(files) // 4))]
    rest = files[len(calib):][: args.int8_eval_count]
    return calib, rest, f"the {len(rest)} images of {args.int8} after the {len(calib)} calibration ones"


def export_bundle(args: argparse.Namespace, model: nn.Module, arch: Optional[Dict], payload: Dict) -> Dict:
    """--bundle: FP32, or INT8 calibrated on --int8's whole images and verified on its held-out ones."""
    calibration, eval_from = [], ""
    if args.int8:
        calib_files, verification, eval_from = split_calibration(args, is_qat_model(model))
        calib_files = decodable(calib_files, "calibration", args.int8)
        verification = decodable(verification, "verification", eval_from)
        calibration = [pad_to(image_tensor(load_rgb(f)).numpy(), 64) for f in calib_files]
    elif args.int8_eval_dir:
        verification = image_files(Path(args.int8_eval_dir), "verification")[: args.int8_eval_count]
        eval_from = args.int8_eval_dir
    else:
        verification = [verification_file(args, payload)]
    manifest = write_bundle(model, arch, Path(args.bundle), verification, calibration,
                            args.precision if args.int8 else "fp32", args.upsample, args.opset, source=args.ckpt,
                            calibration_from=args.int8 or "", range_method=args.calib_method)
    return {"bundle": args.bundle, "manifest": manifest, "eval_from": eval_from}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    check_counts(args)
    if args.bundle:
        check_target(Path(args.bundle))
        model, arch, payload = load_export_model(args)
        return export_bundle(args, model, arch, payload)
    if not args.out:
        raise UserError("give --out PATH (one graph) or --bundle DIR (a codec bundle)")
    if args.int8 and args.part == "full":
        raise UserError("--int8 quantises the encoder or the decoder: use --part encoder or --part decoder")
    out = check_arguments(args)
    model, arch, payload = load_export_model(args)
    qat_model = model if is_qat_model(model) else None
    if qat_model is not None:
        model = float_twin(qat_model)
        print(f"QAT checkpoint ({arch['qat']['precision']}, {arch['qat']['scales']} scales): {out} holds its float "
              f"weights; --int8 writes {out.with_suffix('.int8.onnx')} with its own scales")
    stride = int(getattr(model, "downsampling_factor", 16))
    if args.input_size % stride:
        raise UserError(f"--input_size {args.input_size} must be a positive multiple of the model's stride {stride}")
    image = verification_image(args, payload, (args.input_size, args.input_size))
    example = part_input(model, args.part, image)
    if args.part == "decoder":
        print(f"decoder input: M={example.shape[1]} latent {example.shape[2]}x{example.shape[3]} "
              f"(input_size {args.input_size} / stride {stride})")
    with verified_output(out, args.opset) as staged:
        module, _ = export_graph(model, args.part, example, staged, args.opset, args.dynamic)
        onnx.checker.check_model(onnx.load(str(staged)))
        errors = {f"{args.input_size}x{args.input_size}": output_errors(module, staged, example)}
        if args.dynamic:
            second = (args.input_size + 2 * stride, args.input_size + stride)
            second_in = part_input(model, args.part, verification_image(args, payload, second))
            errors[f"{second[0]}x{second[1]}"] = output_errors(module, staged, second_in)
        histogram = op_histogram(staged)
        print(f"exported {args.part} -> {out} (opset {args.opset}{', dynamic H/W' if args.dynamic else ''})")
        print("ops: " + ", ".join(f"{op}x{n}" for op, n in histogram.items()))
        for size, errs in errors.items():
            print(f"onnxruntime vs PyTorch at {size}: max abs error "
                  + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        checked = "y" if args.part == "full" else None
        worst = max(e[checked] if checked else max(e.values()) for e in errors.values())
        if not worst <= MAX_ABS_ERROR:
            raise UserError(f"export mismatch: max abs error {worst:.2e} > {MAX_ABS_ERROR:g}")
        if arch is not None and arch["replace"] == "npu" and args.part != "full":
            found = sorted(op for op in histogram if op in NPU_FORBIDDEN_OPS)
            if found:
                raise UserError(f"NPU export of the {args.part} contains ops integer NPUs cannot run: {found}")
            print(f"NPU check passed: no {', '.join(NPU_FORBIDDEN_OPS)}")
    report = {"ops": histogram, "errors": errors, "out": str(out)}
    if args.int8:
        calib_files, eval_files, eval_from = split_calibration(args, qat_model is not None)
        calib_files = decodable(calib_files, "calibration", args.int8)
        eval_files = decodable(eval_files, "round-trip", args.int8_eval_dir or args.int8)
        report["int8"] = int8_report(qat_model or model, args.part, out, image, calib_files, eval_files, eval_from,
                                     args.input_size, args.dynamic, args.opset, calib_source=args.int8,
                                     profile=args.precision, range_method=args.calib_method,
                                     with_sensitivity=args.int8_sensitivity)
    return report


if __name__ == "__main__":
    run_cli(main)
