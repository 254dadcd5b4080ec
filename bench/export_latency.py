"""Encoder/decoder latency: PyTorch vs onnxruntime, FP32 and static INT8, at 224x224 and 768x512.

    python -m bench.export_latency --calib_dir ../shared/data/minicoco/val2017 [--ckpt last.pt] [--replace npu]

Without --ckpt the architecture is built with random weights (latency does not
depend on the weights). Each figure is the median of --repeat timed runs after
warm-up, on this machine's CPU, with torch and onnxruntime both at their
default thread counts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.int8_study import quantize_int8
from src.data import image_files
from src.images import center_crop_tensor
from src.model_factory import build_model, load_checkpoint_model, make_arch, quality_index
from src.quant.onnx_export import export_graph, part_input
from src.quant.ptq import run, session

SIZES = ((224, 224), (512, 768))


def median_ms(fn, repeat: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib_dir", required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--replace", default="npu", choices=("none", "relu", "npu"))
    parser.add_argument("--quality", type=quality_index, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    if args.ckpt:
        model, arch, _ = load_checkpoint_model(Path(args.ckpt))
    else:
        arch = make_arch(quality=args.quality, replace=args.replace, replace_parts="all")
        model = build_model(arch)
    model.eval()
    files = image_files(Path(args.calib_dir), "calibration")[:8]
    crops = [center_crop_tensor(f, SIZES[0]) for f in files]
    print(f"{arch['base_model']} q={arch['quality']} replace={arch['replace']}/{arch['replace_parts']}, "
          f"torch threads={torch.get_num_threads()}, median of {args.repeat}")
    print(f"{'part':<8}{'size':>10}{'torch fp32':>12}{'ort fp32':>10}{'ort int8':>10}   (ms)")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for part in ("encoder", "decoder"):
            fp32 = Path(tmp) / f"{part}.onnx"
            module, _ = export_graph(model, part, part_input(model, part, crops[0]), fp32, 13, dynamic=True)
            calib = [c.numpy() for c in crops] if part == "encoder" else \
                [part_input(model, part, c).numpy() for c in crops]
            q8 = quantize_int8(fp32, Path(tmp) / f"{part}.int8.onnx", calib)
            sessions = {"fp32": session(fp32), "int8": session(q8)}
            for h, w in SIZES:
                image = torch.rand(1, 3, h, w)
                x = part_input(model, part, image)
                array = x.numpy()
                torch_ms = median_ms(lambda: module(x), args.repeat)
                ort_ms = {k: median_ms(lambda s=s: run(s, array), args.repeat) for k, s in sessions.items()}
                print(f"{part:<8}{f'{w}x{h}':>10}{torch_ms:>12.1f}{ort_ms['fp32']:>10.1f}{ort_ms['int8']:>10.1f}")


if __name__ == "__main__":
    main()
