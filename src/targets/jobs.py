"""What a toolchain worker is given: the symbol-interface graphs of one model, its calibration and eval arrays.

The graphs are ``src.quant.symbols``' symbol interface, so a target model has the codec's own boundary: the encoder
graph ends at ``y - median`` (``encoder_centred``: no Round, the target's output quantiser at scale 1 is the
rounding, as in the project's ONNX INT8) and the decoder graph takes the symbols. Calibration and eval arrays are
whole photos padded to a multiple of 64 as ``src.eval`` pads them (the decoder's: the FP32 encoder's symbols of
the calibration photos; the symbols decoded from the bitstream for eval).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from src.cli import UserError
from src.eval import readable_images
from src.images import image_tensor, list_images, load_rgb
from src.quant.ptq import pad_to
from src.quant.scheme import DEFAULT_RANGE_METHOD
from src.quant.symbols import ENCODER_OUTPUT

PAD_MULTIPLE = 64
MIN_CALIBRATION_PHOTOS = 4


def load_photos(folder: Path, count: int, role: str, minimum: int = 1) -> List[torch.Tensor]:
    """Up to ``count`` readable photos of ``folder`` (sorted by name), whole, as (1, 3, H, W) in [0, 1].

    Unreadable files are named and skipped; fewer than ``minimum`` readable ones is one line.
    """
    if not Path(folder).is_dir():
        raise UserError(f"{role} folder {folder} does not exist")
    files = list_images(Path(folder))
    if not files:
        raise UserError(f"{role} folder {folder} holds no images")
    good = readable_images(files)[:count]
    if len(good) < minimum:
        raise UserError(f"{role} needs at least {minimum} readable photos, {folder} has {len(good)}")
    return [image_tensor(load_rgb(f)) for f in good]


def padded(images: Sequence[torch.Tensor]) -> List[np.ndarray]:
    return [pad_to(image.numpy().astype(np.float32), PAD_MULTIPLE) for image in images]


def compile_shapes(input_size: Tuple[int, int], latent_channels: int) -> Dict[str, List[int]]:
    """Static shapes the artefacts are compiled (and their latency estimated) for: W x H -> NCHW."""
    width, height = input_size
    if width % PAD_MULTIPLE or height % PAD_MULTIPLE:
        raise UserError(f"--input_size {width}x{height}: both sides must be multiples of {PAD_MULTIPLE}")
    return {"encoder": [1, 3, height, width],
            "decoder": [1, latent_channels, height // 16, width // 16]}


def write_arrays(path: Path, arrays: Sequence[np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, *[np.asarray(a, np.float32) for a in arrays])
    return path


def read_arrays(path: Path) -> List[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def part_spec(onnx_path: Path, input_name: str, output_name: str, calibration: Path,
              eval_arrays: Optional[Path], compile_shape: Sequence[int]) -> Dict:
    """One part of a job; without ``eval_arrays`` the worker compiles and reports only."""
    spec = {"onnx": str(Path(onnx_path).resolve()), "input": input_name, "output": output_name,
            "calibration": str(Path(calibration).resolve()), "compile_shape": list(compile_shape)}
    if eval_arrays is not None:
        spec["eval"] = str(Path(eval_arrays).resolve())
    return spec


def write_job(path: Path, target: str, precision: str, parts: Dict[str, Dict], out_dir: Path,
              cache_dir: Optional[Path] = None, range_method: str = DEFAULT_RANGE_METHOD) -> Path:
    """One job file of the worker protocol (``docs/npu_targets.md``); ``cache_dir`` (optional) lets a worker
    reuse what does not depend on the target (the Ethos-U int8 model is the same for U55, U65 and U85);
    ``range_method`` is how the worker chooses activation ranges where its toolchain takes them
    (``src.quant.range_choice``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    job = {"target": target, "precision": precision, "parts": parts, "out_dir": str(Path(out_dir).resolve()),
           "range_method": range_method}
    if cache_dir is not None:
        job["cache_dir"] = str(Path(cache_dir).resolve())
    path.write_text(json.dumps(job, indent=2))
    return path


def encoder_part(graphs: Dict[str, Path], calibration: Path, eval_arrays: Optional[Path],
                 shape: Sequence[int]) -> Dict:
    return part_spec(graphs["encoder_centred"], "x", ENCODER_OUTPUT, calibration, eval_arrays, shape)


def decoder_part(graphs: Dict[str, Path], calibration: Path, eval_arrays: Optional[Path],
                 shape: Sequence[int]) -> Dict:
    return part_spec(graphs["decoder"], ENCODER_OUTPUT, "x_hat", calibration, eval_arrays, shape)
