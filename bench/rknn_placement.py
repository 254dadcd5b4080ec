"""Where RK3588's compiler puts the codec's operators: the symbol graphs of a GDN control, a ReLU model and an NPU-block
model through ``targets/rknn/worker.py`` at one input size, w8a8 and a16w8, one table printed.

    .venv/bin/python -m bench.rknn_placement --size 512x768 --out bench_out/rknn

Weights are untrained (no checkpoint needed) except for one thing: the NPU blocks are zero-initialised (each
starts as the identity), and the toolkit folds a branch of zero weights away, so every all-zero parameter of
g_a / g_s gets N(0, 0.05^2) noise first (``--perturb``). Placement and the compiler's estimates depend on the
graph, not on trained values; the numbers in the table (symbols equal to FP32's, decoder PSNR against the FP32
decoder on the same symbols) are those of these weights, calibrated on two photos shipped by scikit-image and
measured on a third.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from src.images import image_tensor, load_rgb
from src.quant.ptq import pad_to, run, session
from src.quant.symbols import symbol_graphs
from src.model_factory import build_model, make_arch
from src.sample_photos import skimage_photos

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "targets" / "rknn" / "worker.py"
PYTHON = REPO / ".venv-rknn" / "bin" / "python"
MODELS = {"gdn": "none", "relu": "relu", "npu": "npu"}
PHOTOS = ("astronaut", "coffee", "chelsea")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x768", help="HxW of the compiled graphs")
    parser.add_argument("--quality", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["w8a8", "a16w8"], choices=["w8a8", "a16w8"])
    parser.add_argument("--perturb", type=float, default=0.05, help="std of the noise given to all-zero weights")
    parser.add_argument("--out", type=Path, default=Path("bench_out/rknn"))
    return parser


def photo_arrays(size: Sequence[int]) -> List[np.ndarray]:
    """The photos resized to cover ``size`` and centre-cropped to it, (1, 3, H, W) float32 in [0, 1]."""
    arrays = []
    for path in skimage_photos(PHOTOS):
        image = load_rgb(path)
        scale = max(size[0] / image.height, size[1] / image.width)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        left, top = (image.width - size[1]) // 2, (image.height - size[0]) // 2
        arrays.append(image_tensor(image.crop((left, top, left + size[1], top + size[0]))).numpy())
    return arrays


def model_graphs(kind: str, quality: int, perturb: float, example: torch.Tensor, folder: Path) -> Dict[str, Path]:
    torch.manual_seed(0)
    model = build_model(make_arch(quality=quality, replace=kind)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("g_a", "g_s")) and not param.abs().max():
                param.add_(perturb * torch.randn_like(param))
    model.update(force=True)
    return symbol_graphs(model, example, folder)


def job(graphs: Dict[str, Path], images: List[np.ndarray], precision: str, folder: Path, out: Path) -> Path:
    encoder = session(graphs["encoder"])
    symbols = [run(encoder, image) for image in images]
    files = {}
    for name, values in (("enc_calib", images[:2]), ("enc_eval", images[2:]), ("dec_calib", symbols[:2]),
                         ("dec_eval", symbols[2:])):
        files[name] = folder / f"{name}.npz"
        np.savez(files[name], *values)
    spec = {"target": "rk3588", "precision": precision, "out_dir": str(out), "parts": {
        "encoder": {"onnx": str(graphs["encoder_centred"]), "input": "x", "output": "symbols",
                    "calibration": str(files["enc_calib"]), "eval": str(files["enc_eval"])},
        "decoder": {"onnx": str(graphs["decoder"]), "input": "symbols", "output": "x_hat",
                    "calibration": str(files["dec_calib"]), "eval": str(files["dec_eval"])}}}
    path = folder / f"job_{precision}.json"
    path.write_text(json.dumps(spec))
    return path


def numerics(graphs: Dict[str, Path], out: Path, images: List[np.ndarray], folder: Path) -> Dict[str, float]:
    """Target symbols against FP32's, and the target decoder against the FP32 decoder on the same symbols."""
    reference = run(session(graphs["encoder"]), images[2])
    target = np.load(out / "encoder_outputs.npz")["arr_0"]
    decoded = np.load(out / "decoder_outputs.npz")["arr_0"].clip(0, 1)
    fp32_decoded = run(session(graphs["decoder"]), np.load(folder / "dec_eval.npz")["arr_0"]).clip(0, 1)
    mse = float(((decoded - fp32_decoded) ** 2).mean())
    return {"symbols_equal": float((target == reference).mean()),
            "symbols_max_diff": float(np.abs(target - reference).max()),
            "decoder_psnr_vs_fp32": float(10 * np.log10(1 / max(mse, 1e-12)))}


def main(args: argparse.Namespace) -> List[Dict]:
    size = [int(v) for v in args.size.split("x")]
    images = [pad_to(a, 64) for a in photo_arrays(size)]
    rows = []
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            graphs = model_graphs(MODELS[model], args.quality, args.perturb, torch.from_numpy(images[0]), folder)
            for precision in args.precisions:
                out = args.out / f"{model}-{args.size}" / f"rk3588-{precision}"
                done = subprocess.run([str(PYTHON), str(WORKER), str(job(graphs, images, precision, folder, out))],
                                      capture_output=True, text=True)
                if done.returncode:
                    print(f"{model} {precision}: {done.stderr.strip()}")
                    continue
                report = json.loads((out / "report.json").read_text())
                row = {"model": model, "precision": precision, **numerics(graphs, out, images, folder)}
                for part, entry in report["parts"].items():
                    row[part] = {k: entry[k] for k in ("ops_npu", "ops_total", "estimates")}
                    row[part]["fallbacks"] = sorted({f["op"] for f in entry["fallbacks"]})
                rows.append(row)
                print(json.dumps(row), flush=True)
    (args.out / f"placement-{args.size}.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
