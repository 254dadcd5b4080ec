"""Static INT8 quantisation of exported encoder/decoder graphs with onnxruntime.

This is why the NPU blocks exist: integer NPUs run convolutions, adds,
multiplies and clips in INT8, but GDN's division and square root stay in
float (or do not run at all). ``quantize_static`` (QDQ format, per-channel
INT8 weights, UINT8 activations, MinMax calibration) is calibrated on real
image crops; the encoder->decoder round trip then measures what INT8 costs,
in PSNR and in real bits: the encoder's quantisation noise lands in the latent
and is paid in rate, so a PSNR drop alone hides most of the cost.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from src.eval import bitstream_roundtrip
from src.losses import quantised_metrics


class ArrayReader(CalibrationDataReader):
    """Feeds calibration arrays (each (1, C, H, W) float32) to the calibrator one by one."""

    def __init__(self, input_name: str, arrays: Sequence[np.ndarray]):
        self.input_name = input_name
        self.arrays: Iterator[np.ndarray] = iter(arrays)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        array = next(self.arrays, None)
        return None if array is None else {self.input_name: array}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, array: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: array})[0]


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: Sequence[np.ndarray]) -> Path:
    """Write a statically quantised copy of ``fp32_path``, calibrated on ``calibration``."""
    input_name = session(fp32_path).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), ArrayReader(input_name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8_path


def quantise_latent(y: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """What the entropy coder hands the decoder: ``round(y - median) + median`` per channel."""
    return (np.round(y - medians) + medians).astype(np.float32)


def encoder_latents(encoder: Path, images: Sequence[np.ndarray], medians: np.ndarray) -> List[np.ndarray]:
    """Quantised latents of the images: the decoder's calibration data."""
    enc = session(encoder)
    return [quantise_latent(run(enc, image), medians) for image in images]


class OnnxCodec:
    """An ONNX encoder and decoder around the model's own entropy coder: ``compress`` / ``decompress``.

    The same two methods as a CompressAI model, so ``src.eval.bitstream_roundtrip``
    codes an image through the exported (FP32 or INT8) graphs and CompressAI's
    range coder, and the bits it counts are a real bitstream's.
    """

    def __init__(self, encoder: Path, decoder: Path, entropy_bottleneck: nn.Module):
        self.encoder, self.decoder, self.entropy_bottleneck = session(encoder), session(decoder), entropy_bottleneck

    def compress(self, x: torch.Tensor) -> Dict[str, Any]:
        y = torch.from_numpy(run(self.encoder, x.numpy()))
        return {"strings": [self.entropy_bottleneck.compress(y)], "shape": y.shape[-2:]}

    def decompress(self, strings: List[List[bytes]], shape) -> Dict[str, torch.Tensor]:
        y_hat = self.entropy_bottleneck.decompress(strings[0], shape)
        return {"x_hat": torch.from_numpy(run(self.decoder, y_hat.numpy())).clamp_(0, 1)}


def roundtrip(codec: OnnxCodec, images: Sequence[torch.Tensor], multiple: int) -> Dict[str, float]:
    """Mean PSNR, MS-SSIM (8-bit, as ``src.eval``) and real bpp of image -> encoder -> entropy coder -> decoder.

    Each image (1, 3, H, W) is padded to ``multiple`` for coding and measured
    on its own area, as ``src.eval`` does.
    """
    rows = []
    for image in images:
        coded = bitstream_roundtrip(codec, image, multiple)
        metrics = quantised_metrics(image, coded["x_hat"])
        rows.append({"psnr": metrics["psnr"], "ms_ssim": metrics["ms_ssim"],
                     "bpp": coded["bits"] / (image.shape[-2] * image.shape[-1])})
    return {key: float(np.mean([row[key] for row in rows])) for key in ("psnr", "ms_ssim", "bpp")}
