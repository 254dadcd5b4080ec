"""The codec's round trip through a target's quantised model, with real bits through the project's entropy coder.

A target's encoder and decoder run inside its worker (another venv, another process), so one image's round trip
is split in passes: the worker's encoder gives each padded eval image's symbols; the project's coder writes them
(``code_symbols``: real rANS strings, decoded back and checked); the worker's decoder runs on the decoded
symbols. ``ReplayCodec`` then hands ``src.codec.roundtrip.bitstream_roundtrip`` (via ``src.quant.ptq.mean_points``) those
strings and decoded images, so padding, cropping, bits and metrics are computed by exactly the code that measures
the FP32 and ONNX INT8 codecs beside it.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from compressai.entropy_models import EntropyModel
from torch import nn


def code_symbols(entropy_bottleneck: nn.Module, symbols: np.ndarray) -> Tuple[List[bytes], np.ndarray]:
    """(rANS strings of ``symbols`` (1, M, h, w), the symbols decoded from them) with the model's factorized prior."""
    tensor = torch.from_numpy(np.round(symbols).astype(np.float32))
    eb = entropy_bottleneck
    strings = EntropyModel.compress(eb, tensor, eb._build_indexes(tensor.size()))
    decoded = EntropyModel.decompress(eb, strings, eb._build_indexes(tensor.size()), torch.float32)
    if not torch.equal(decoded, tensor):
        raise RuntimeError("the entropy coder did not return the symbols it was given")
    return strings, decoded.numpy()


def key(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, np.float32).tobytes()).hexdigest()


class ReplayCodec:
    """``compress`` / ``decompress`` over a target's results: strings by padded image, decoded images by symbols.

    ``decompress`` really decodes the strings; only the decoder network's output is looked up (the target's
    decoder was run by its worker on exactly these decoded symbols).
    """

    def __init__(self, entropy_bottleneck: nn.Module, strings: Dict[str, List[bytes]],
                 decoded: Dict[str, np.ndarray]):
        self.entropy_bottleneck, self.strings, self.decoded = entropy_bottleneck, strings, decoded

    def compress(self, x: torch.Tensor) -> Dict:
        strings = self.strings[key(x.numpy())]
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        return {"strings": [strings], "shape": (h, w)}

    def decompress(self, strings: List[List[bytes]], shape) -> Dict[str, torch.Tensor]:
        eb = self.entropy_bottleneck
        size = (len(strings[0]), eb.quantiles.shape[0], *shape)
        symbols = EntropyModel.decompress(eb, strings[0], eb._build_indexes(size), torch.float32)
        return {"x_hat": torch.from_numpy(self.decoded[key(symbols.numpy())]).clamp_(0, 1)}


def symbol_summary(symbols: Sequence[np.ndarray]) -> Dict:
    """Whether the target encoder's outputs are integers (the symbol interface kept), and their range."""
    values = np.concatenate([s.ravel() for s in symbols])
    return {"integer": bool(np.all(values == np.round(values))), "min": float(values.min()),
            "max": float(values.max())}
