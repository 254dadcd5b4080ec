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
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from compressai.zoo.image import model_architectures
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from src.checkpoint import read_checkpoint, state_and_arch
from src.cli import UserError, run_cli
from src.data import image_files
from src.images import center_crop_box, load_rgb, upscale_to_fit
from src.model_factory import build_model, load_weights, make_arch
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
    return p


def load_export_model(args: argparse.Namespace) -> Tuple[nn.Module, Optional[Dict], Dict]:
    """(model, arch, checkpoint payload); --replace_parts must agree with the checkpoint."""
    path = Path(args.ckpt)
    payload = read_checkpoint(path)
    state, arch = state_and_arch(payload, path)
    if arch is None:
        model = model_architectures["bmshj2018-factorized"].from_state_dict(state)
        if args.replace_parts not in (None, "none"):
            model = replace_gdn_with_relu(model, args.replace_parts)
        return model.eval(), None, payload
    arch = make_arch(**arch)
    if args.replace_parts is not None and args.replace_parts != arch["replace_parts"]:
        if arch["replace"] != "none":
            raise UserError(f"--replace_parts {args.replace_parts} contradicts {path}, which holds "
                            f"{arch['replace']}/{arch['replace_parts']}")
    model = load_weights(build_model(arch), state, str(path))
    if args.replace_parts not in (None, "none") and arch["replace"] == "none":
        model = replace_gdn_with_relu(model, args.replace_parts)
        arch = make_arch(**dict(arch, replace="relu", replace_parts=args.replace_parts))
    return model.eval(), arch, payload


def verification_image(args: argparse.Namespace, payload: Dict, size: Tuple[int, int]) -> torch.Tensor:
    """A real photo cropped to ``size`` (H, W), as (1, 3, H, W) in [0, 1]."""
    if args.image:
        path = Path(args.image)
    else:
        run_args = payload.get("args") or {}
        if not run_args.get("coco_dir"):
            raise UserError("no image to verify the export on: pass --image PATH")
        sub = "val" if run_args.get("use_prepared", True) else "val2017"
        path = image_files(Path(run_args["coco_dir"]) / sub, "verification")[0]
    img = load_rgb(path)
    h, w = size
    if img.size[0] < w or img.size[1] < h:
        img = upscale_to_fit(img, max(h, w))
    left, top, _, _ = center_crop_box(img.size[0], img.size[1], 0)
    img = img.crop((left - w // 2, top - h // 2, left - w // 2 + w, top - h // 2 + h))
    return pil_to_tensor(img).float().div(255).unsqueeze(0)


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


def part_input(model: nn.Module, part: str, image: torch.Tensor) -> torch.Tensor:
    """The export input for ``part``: the image, or for the decoder the rounded latent of the image."""
    if part != "decoder":
        return image
    with torch.no_grad():
        return torch.round(model.g_a(image))


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
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
    return {"ops": histogram, "errors": errors, "out": str(out)}


if __name__ == "__main__":
    run_cli(main)
