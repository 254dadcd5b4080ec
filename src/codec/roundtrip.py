"""The bitstream round trip that eval, the demo, PTQ and export share: pad, ``compress``, ``decompress``, crop.

Anything with CompressAI's ``compress`` / ``decompress`` goes through it: a
CompressAI model (``src.eval``), or ONNX graphs around the model's range
coder (``src.quant.ptq.SymbolCodec``), so the bits it counts are a real
bitstream's wherever it is used.
"""

from __future__ import annotations

import time
from typing import Any, Dict

import torch
import torch.nn.functional as F
from compressai.ops import compute_padding

from src.codec.latents import codable_latents

PAD_MULTIPLE = 2 ** 6

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer read after it measures the work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bitstream_roundtrip(model, x: torch.Tensor, multiple: int = PAD_MULTIPLE, *,
                        source: str = "the model") -> Dict[str, Any]:
    """Pad to a multiple of ``multiple``, ``compress`` / ``decompress`` with the real entropy coder, crop back.

    Returns the decoded image, the bits written and the coding times (the device synchronised
    around each, so CUDA times hold the work and not just its launch); ``x`` is (1, 3, H, W).
    ``model`` is anything with CompressAI's ``compress``/``decompress`` (``src.quant.ptq.SymbolCodec`` too).
    A CompressAI model's latents are checked before its range coder sees them (``src.codec.latents``; a
    diverged checkpoint is one line naming ``source``, not a coder that never returns).
    """
    h, w = x.shape[-2:]
    pad, unpad = compute_padding(h, w, min_div=multiple)
    x_padded = F.pad(x, pad, mode="constant", value=0)
    synchronize(x.device)
    start = time.perf_counter()
    with codable_latents(model, source):
        enc = model.compress(x_padded)
    synchronize(x.device)
    enc_s = time.perf_counter() - start
    start = time.perf_counter()
    dec = model.decompress(enc["strings"], enc["shape"])
    synchronize(x.device)
    dec_s = time.perf_counter() - start
    bits = sum(len(s) for strings in enc["strings"] for s in strings) * 8
    return {"x_hat": F.pad(dec["x_hat"], unpad), "bits": bits, "enc_s": enc_s, "dec_s": dec_s,
            "x_padded": x_padded}
