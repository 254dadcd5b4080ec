"""The recipe's loss and metrics, always computed in FP32.

Two distortions (``--distortion``):

- ``l1_msssim`` (the recipe's own): ``a * L1 + (1 - a) * (1 - MS-SSIM)``;
- ``mse`` (CompressAI's ``RateDistortionLoss``): ``255^2 * MSE`` on [0, 1] images.

``recon`` trains the distortion alone; ``rd`` adds ``lambda_bpp * bpp`` with
``bpp = sum(-log2(likelihoods)) / pixels``. CompressAI's loss is
``lmbda * 255^2 * MSE + bpp``, i.e. ours times ``lmbda``: ``--lambda_bpp 1/lmbda``
reproduces its trade-off (``ZOO_LAMBDA_BPP``). MS-SSIM comes from
pytorch-msssim on images clamped to [0, 1]. Metrics follow CompressAI's
conventions (PSNR per image, then averaged) so numbers compare with its results.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim

MSSSIM_WINDOW = 11
DISTORTIONS = ("l1_msssim", "mse")
LOSS_TYPES = ("recon", "rd")
# CompressAI's lmbda per quality for bmshj2018-factorized/-hyperprior mse (compressai/zoo/image.py's training setup).
ZOO_LMBDA = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.1800}
# --lambda_bpp that makes ``255^2 * MSE + lambda_bpp * bpp`` CompressAI's loss divided by its lmbda.
ZOO_LAMBDA_BPP = {q: 1.0 / lmbda for q, lmbda in ZOO_LMBDA.items()}
_MSSSIM_DOWNSAMPLINGS = 4


@functools.lru_cache(maxsize=None)
def msssim_window(side: int) -> int:
    """Gaussian window for MS-SSIM on images whose shorter side is ``side``.

    MS-SSIM's 5 scales need side > (win - 1) * 16: 11 for crops over 160 px.
    Smaller crops (tests, tiny runs) get the largest odd window that fits, and
    the change is printed once per size.
    """
    if side > (MSSSIM_WINDOW - 1) * 2 ** _MSSSIM_DOWNSAMPLINGS:
        return MSSSIM_WINDOW
    window = (side - 1) // 2 ** _MSSSIM_DOWNSAMPLINGS
    window = window if window % 2 == 1 else window - 1
    if window < 3:
        raise ValueError(f"MS-SSIM needs images over 32 px on the shorter side, got {side}")
    print(f"note: {side}px images are too small for MS-SSIM's 11-px window over 5 scales; using {window}")
    return window


def msssim_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    win = msssim_window(int(min(x.shape[-2:])))
    return ms_ssim(x_hat.float().clamp(0, 1), x.float(), data_range=1.0, size_average=False, win_size=win)


def psnr_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    mse = F.mse_loss(x_hat.float().clamp(0, 1), x.float(), reduction="none").flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] as the 0..255 levels a saved 8-bit image holds (float tensor)."""
    return (x.float().clamp(0, 1) * 255).round()


def psnr_8bit(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """PSNR over the whole tensor on 8-bit levels, as CompressAI 1.2.8's eval_model computes it."""
    mse = (to_8bit(x) - to_8bit(x_hat)).pow(2).mean().clamp_min(1e-10)
    return 20 * math.log10(255) - 10 * torch.log10(mse).item()


def quantised_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> Dict[str, float]:
    """PSNR and MS-SSIM of (1, 3, H, W) images on 8-bit values, as CompressAI's eval_model computes them."""
    win = msssim_window(int(min(x.shape[-2:])))
    return {"psnr": psnr_8bit(x, x_hat),
            "ms_ssim": ms_ssim(to_8bit(x), to_8bit(x_hat), data_range=255, win_size=win).item()}


def bpp_from_likelihoods(likelihoods: Mapping[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated bits per pixel over the whole batch (FP32)."""
    bits = sum(torch.log(lk.float()).sum() for lk in likelihoods.values())
    return bits / (-math.log(2) * num_pixels)


class RecipeLoss(torch.nn.Module):
    """The distortion [+ ``lambda_bpp * bpp``], returned with its parts.

    Parts: ``total`` (what is minimised), ``distortion`` (its distortion term),
    ``bpp``, and per distortion ``l1``, ``1-msssim``, ``msssim``
    (``l1_msssim``) or ``mse`` (``mse``, on [0, 1], as CompressAI logs it).
    The ``mse`` path computes no MS-SSIM: it does exactly CompressAI's work.
    """

    def __init__(self, alpha_l1: float = 0.4, loss_type: str = "recon", lambda_bpp: float = 0.01,
                 distortion: str = "l1_msssim"):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if distortion not in DISTORTIONS:
            raise ValueError(f"distortion must be one of {DISTORTIONS}, got {distortion!r}")
        self.alpha_l1, self.loss_type, self.lambda_bpp = alpha_l1, loss_type, lambda_bpp
        self.distortion = distortion

    def distortion_parts(self, x_hat: torch.Tensor, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.distortion == "mse":
            mse = F.mse_loss(x_hat, x)
            return {"distortion": 255.0 ** 2 * mse, "mse": mse}
        l1 = F.l1_loss(x_hat, x)
        msssim = msssim_per_image(x_hat, x).mean()
        return {"distortion": self.alpha_l1 * l1 + (1.0 - self.alpha_l1) * (1.0 - msssim),
                "l1": l1, "1-msssim": 1.0 - msssim, "msssim": msssim}

    def forward(self, output: Mapping, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            parts = self.distortion_parts(output["x_hat"].float(), x)
            n, _, h, w = x.shape
            parts["bpp"] = bpp_from_likelihoods(output["likelihoods"], n * h * w)
            total = parts["distortion"]
            parts["total"] = total + self.lambda_bpp * parts["bpp"] if self.loss_type == "rd" else total
        return parts
