"""Static INT8 quantisation of exported encoder/decoder graphs with onnxruntime.

This is why the NPU blocks exist: integer NPUs run convolutions, adds,
multiplies and clips in INT8, but GDN's division and square root stay in
float (or do not run at all). ``quantize_static`` (QDQ format, per-channel
INT8 weights, UINT8 activations, MinMax calibration) is calibrated on real
image crops; the encoder->decoder round trip then measures what INT8 costs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from src.losses import psnr_8bit


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


def roundtrip_psnr(encoder: Path, decoder: Path, images: Sequence[np.ndarray], medians: np.ndarray) -> float:
    """Mean PSNR of image -> encoder -> quantise -> decoder, per image."""
    enc, dec = session(encoder), session(decoder)
    scores: List[float] = []
    for image in images:
        x_hat = run(dec, quantise_latent(run(enc, image), medians))
        scores.append(psnr_8bit(torch.from_numpy(image), torch.from_numpy(x_hat)))
    return float(np.mean(scores))


def encoder_latents(encoder: Path, images: Sequence[np.ndarray], medians: np.ndarray) -> List[np.ndarray]:
    """Quantised latents of the images: the decoder's calibration data."""
    enc = session(encoder)
    return [quantise_latent(run(enc, image), medians) for image in images]
