"""Export a checkpoint to ONNX and verify the export before returning.

    python -m scripts.export_onnx --ckpt checkpoints/last.pt --part encoder --out onnx/enc.onnx --input_size 224

Parts: ``encoder`` (g_a: image -> latent y), ``decoder`` (g_s: y_hat -> image;
latent channels M and latent size input_size / stride are read from the model),
``full`` (forward pass: reconstruction and likelihoods). Every export is
checked with ``onnx.checker``, run in onnxruntime against PyTorch on a real
image crop (max abs error above 1e-3 fails), and its op histogram is printed.
For the NPU variant the encoder/decoder graphs must not contain Div, Sqrt,
Pow, Exp, Log, Sigmoid, Tanh, Erf or Softplus, or the command fails.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from compressai.zoo import load_state_dict as rename_zoo_keys
from compressai.zoo.image import model_architectures
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from src import onnx_int8 as int8
from src.checkpoint import read_checkpoint, state_and_arch
from src.cli import UserError, run_cli
from src.data import image_files
from src.images import DECODE_ERRORS, load_rgb, upscale_to_fit
from src.model_factory import make_arch, model_from_checkpoint
from src.replace_gdn import REPLACE_MODES, replace_gdn_with_relu

NPU_FORBIDDEN_OPS = ("Div", "Sqrt", "Pow", "Exp", "Log", "Sigmoid", "Tanh", "Erf", "Softplus")
MAX_ABS_ERROR = 1e-3


class FullForward(nn.Module):
    """``model.forward`` as ONNX can carry it: (y, x_hat, likelihoods of y).

    y (the latent before rounding) is an output too: rounding turns a 1e-7
    difference at a .5 boundary into a whole quantisation step, so the full
    graph is verified on y, and x_hat / likelihoods are reported for reference.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return self.model.g_a(x), out["x_hat"], next(iter(out["likelihoods"].values()))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX, verified against PyTorch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of this project, or a plain CompressAI state dict")
    p.add_argument("--part", default="full", choices=("full", "encoder", "decoder"))
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--input_size", type=int, default=224, help="image side the graph is traced at")
    p.add_argument("--dynamic", action="store_true", help="dynamic H/W axes (also verified at a second size)")
    p.add_argument("--opset", type=int, default=13)
    p.add_argument("--replace_parts", default=None, choices=sorted(REPLACE_MODES),
                   help="apply GDN->ReLU to a checkpoint without replacement (e.g. a zoo state dict)")
    p.add_argument("--image", default=None, help="real image for verification (default: first val image of the run)")
    p.add_argument("--int8", default=None, metavar="CALIB_DIR",
                   help="also write a static INT8 model (OUT with .int8.onnx), calibrated on images in CALIB_DIR, "
                        "and report the INT8 encoder->decoder PSNR drop on them")
    p.add_argument("--calib_count", type=int, default=32, help="calibration images used from CALIB_DIR")
    p.add_argument("--int8_eval_dir", default=None,
                   help="held-out images for the FP32-vs-INT8 round trip (default: CALIB_DIR's images after the "
                        "calibration ones; the report is never measured on the calibration images)")
    p.add_argument("--int8_eval_count", type=int, default=16, help="round-trip images used")
    return p


def load_export_model(args: argparse.Namespace) -> Tuple[nn.Module, Optional[Dict], Dict]:
    """(model, arch, checkpoint payload); --replace_parts must agree with the checkpoint."""
    path = Path(args.ckpt)
    payload = read_checkpoint(path)
    state, arch = state_and_arch(payload, path)
    if arch is None:  # a plain CompressAI state dict (zoo .pth.tar): old key names are renamed first
        model = model_architectures["bmshj2018-factorized"].from_state_dict(rename_zoo_keys(dict(state)))
        if args.replace_parts not in (None, "none"):
            model = replace_gdn_with_relu(model, args.replace_parts)
        return model.eval(), None, payload
    model, arch = model_from_checkpoint(state, arch, str(path))
    if args.replace_parts is not None and args.replace_parts != arch["replace_parts"] and arch["replace"] != "none":
        raise UserError(f"--replace_parts {args.replace_parts} contradicts {path}, which holds "
                        f"{arch['replace']}/{arch['replace_parts']}")
    if args.replace_parts not in (None, "none") and arch["replace"] == "none":
        model = replace_gdn_with_relu(model, args.replace_parts)
        arch = make_arch(**dict(arch, replace="relu", replace_parts=args.replace_parts))
    return model.eval(), arch, payload


def center_crop_tensor(path: Path, size: Tuple[int, int]) -> torch.Tensor:
    """A real photo center-cropped to ``size`` (H, W), as (1, 3, H, W) in [0, 1]."""
    img = load_rgb(path)
    h, w = size
    if img.size[0] < w or img.size[1] < h:
        img = upscale_to_fit(img, max(h, w))
    left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
    img = img.crop((left, top, left + w, top + h))
    return pil_to_tensor(img).float().div(255).unsqueeze(0)


def verification_image(args: argparse.Namespace, payload: Dict, size: Tuple[int, int]) -> torch.Tensor:
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
    try:
        return center_crop_tensor(path, size)
    except DECODE_ERRORS as err:
        raise UserError(f"verification image {path} cannot be decoded ({str(err).splitlines()[0][:100]}); "
                        "pass another --image") from None


def export_graph(model: nn.Module, part: str, example: torch.Tensor, out: Path, opset: int,
                 dynamic: bool) -> Tuple[nn.Module, List[str]]:
    module = {"encoder": model.g_a, "decoder": model.g_s, "full": FullForward(model)}[part]
    inputs = ["y_hat"] if part == "decoder" else ["x"]
    outputs = {"encoder": ["y"], "decoder": ["x_hat"], "full": ["y", "x_hat", "likelihoods"]}[part]
    axes = {name: {2: "height", 3: "width"} for name in inputs + outputs} if dynamic else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is the one that targets opset 13 without onnxscript.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(module, (example,), str(out), input_names=inputs, output_names=outputs,
                          opset_version=opset, dynamic_axes=axes, dynamo=False)
    return module, outputs


def op_histogram(path: Path) -> Dict[str, int]:
    graph = onnx.load(str(path)).graph
    return dict(sorted(collections.Counter(node.op_type for node in graph.node).items()))


@torch.no_grad()
def output_errors(module: nn.Module, path: Path, example: torch.Tensor) -> Dict[str, float]:
    """Max abs error of each graph output, onnxruntime against PyTorch."""
    expected = module(example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    names = [o.name for o in session.get_outputs()]
    return {n: float(np.abs(g - e.numpy()).max()) for n, g, e in zip(names, got, expected)}


def latent_medians(model: nn.Module) -> np.ndarray:
    """Per-channel medians of the entropy bottleneck, shaped (1, M, 1, 1)."""
    with torch.no_grad():
        return model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1).float().numpy()


def part_input(model: nn.Module, part: str, image: torch.Tensor) -> torch.Tensor:
    """The export input for ``part``: the image, or for the decoder the quantised latent of the image."""
    if part != "decoder":
        return image
    with torch.no_grad():
        return torch.from_numpy(int8.quantise_latent(model.g_a(image).numpy(), latent_medians(model)))


def split_calibration(args: argparse.Namespace) -> Tuple[List[Path], List[Path], str]:
    """(calibration files, round-trip files, where the latter come from): never the same images.

    MinMax ranges never clip the images they were measured on, so a round
    trip on the calibration images would flatter INT8.
    """
    files = image_files(Path(args.int8), "calibration")
    if args.int8_eval_dir:
        held_out = image_files(Path(args.int8_eval_dir), "INT8 evaluation")[: args.int8_eval_count]
        return files[: args.calib_count], held_out, str(args.int8_eval_dir)
    if len(files) < 2:
        raise UserError(f"--int8 {args.int8} holds {len(files)} image: calibration and the round trip need "
                        "different images; add images or pass --int8_eval_dir DIR")
    calib = files[: min(args.calib_count, len(files) - max(1, len(files) // 4))]
    rest = files[len(calib):][: args.int8_eval_count]
    return calib, rest, f"the {len(rest)} images of {args.int8} after the {len(calib)} calibration ones"


def int8_report(model: nn.Module, args: argparse.Namespace, out: Path, opset: int) -> Dict:
    """Quantise encoder and decoder on CALIB_DIR crops; keep the INT8 model of ``--part``.

    The round trip needs both halves, so the other half is exported and
    quantised too (in a temp folder unless it is the part asked for).
    """
    calib_files, eval_files, eval_from = split_calibration(args)
    crops = [center_crop_tensor(f, (args.input_size, args.input_size)) for f in calib_files]
    images = [c.numpy() for c in crops]
    held_out = [center_crop_tensor(f, (args.input_size, args.input_size)).numpy() for f in eval_files]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for part in ("encoder", "decoder"):
            fp32 = out if part == args.part else Path(tmp) / f"{part}.onnx"
            if part != args.part:
                export_graph(model, part, part_input(model, part, crops[0]), fp32, opset, args.dynamic)
            paths[part] = fp32
        medians = latent_medians(model)
        latents = int8.encoder_latents(paths["encoder"], images, medians)
        int8_paths = {
            part: int8.quantize_int8(paths[part], (out.with_suffix(".int8.onnx") if part == args.part
                                                   else Path(tmp) / f"{part}.int8.onnx"), calib)
            for part, calib in (("encoder", images), ("decoder", latents))
        }
        fp32_psnr = int8.roundtrip_psnr(paths["encoder"], paths["decoder"], held_out, medians)
        int8_psnr = int8.roundtrip_psnr(int8_paths["encoder"], int8_paths["decoder"], held_out, medians)
        float_ops = sorted(op for op in op_histogram(int8_paths[args.part]) if op in NPU_FORBIDDEN_OPS)
    report = {"int8_path": str(out.with_suffix(".int8.onnx")), "calib_images": len(images),
              "eval_images": len(held_out), "eval_from": eval_from,
              "psnr_fp32": fp32_psnr, "psnr_int8": int8_psnr, "psnr_drop": fp32_psnr - int8_psnr,
              "float_only_ops": float_ops}
    print(f"INT8 {args.part} -> {report['int8_path']} (calibrated on {len(images)} crops of {args.int8})")
    print(f"encoder->decoder round trip PSNR on {len(held_out)} held-out images ({eval_from}): "
          f"FP32 {fp32_psnr:.3f} dB, INT8 {int8_psnr:.3f} dB, drop {report['psnr_drop']:.3f} dB")
    if float_ops:
        print(f"ops left in float in the INT8 {args.part}: {', '.join(float_ops)}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    if args.int8 and args.part == "full":
        raise UserError("--int8 quantises the encoder or the decoder: use --part encoder or --part decoder")
    model, arch, payload = load_export_model(args)
    stride = int(getattr(model, "downsampling_factor", 16))
    if args.input_size % stride:
        raise UserError(f"--input_size must be a multiple of the model's stride {stride}")
    out = Path(args.out)
    image = verification_image(args, payload, (args.input_size, args.input_size))
    example = part_input(model, args.part, image)
    if args.part == "decoder":
        print(f"decoder input: M={example.shape[1]} latent {example.shape[2]}x{example.shape[3]} "
              f"(input_size {args.input_size} / stride {stride})")
    module, _ = export_graph(model, args.part, example, out, args.opset, args.dynamic)
    onnx.checker.check_model(onnx.load(str(out)))
    errors = {f"{args.input_size}x{args.input_size}": output_errors(module, out, example)}
    if args.dynamic:
        second = (args.input_size + 2 * stride, args.input_size + stride)
        second_in = part_input(model, args.part, verification_image(args, payload, second))
        errors[f"{second[0]}x{second[1]}"] = output_errors(module, out, second_in)
    histogram = op_histogram(out)
    print(f"exported {args.part} -> {out} (opset {args.opset}{', dynamic H/W' if args.dynamic else ''})")
    print("ops: " + ", ".join(f"{op}x{n}" for op, n in histogram.items()))
    for size, errs in errors.items():
        print(f"onnxruntime vs PyTorch at {size}: max abs error " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
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
        report["int8"] = int8_report(model, args, out, args.opset)
    return report


if __name__ == "__main__":
    run_cli(main)
