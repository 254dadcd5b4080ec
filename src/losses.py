"""The recipe's loss and metrics, always computed in FP32.

``recon = a * L1 + (1 - a) * (1 - MS-SSIM)``; ``rd = recon + lambda_bpp * bpp``
with ``bpp = sum(-log2(likelihoods)) / pixels``. MS-SSIM comes from
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


def bpp_from_likelihoods(likelihoods: Mapping[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated bits per pixel over the whole batch (FP32)."""
    bits = sum(torch.log(lk.float()).sum() for lk in likelihoods.values())
    return bits / (-math.log(2) * num_pixels)


class RecipeLoss(torch.nn.Module):
    """``a*L1 + (1-a)*(1-MS-SSIM)`` [+ ``lambda_bpp * bpp``], returned with its parts."""

    def __init__(self, alpha_l1: float = 0.4, loss_type: str = "recon", lambda_bpp: float = 0.01):
        super().__init__()
        if loss_type not in ("recon", "rd"):
            raise ValueError(f"loss_type must be recon or rd, got {loss_type!r}")
        self.alpha_l1, self.loss_type, self.lambda_bpp = alpha_l1, loss_type, lambda_bpp

    def forward(self, output: Mapping, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            x_hat = output["x_hat"].float()
            l1 = F.l1_loss(x_hat, x)
            msssim = msssim_per_image(x_hat, x).mean()
            n, _, h, w = x.shape
            bpp = bpp_from_likelihoods(output["likelihoods"], n * h * w)
            recon = self.alpha_l1 * l1 + (1.0 - self.alpha_l1) * (1.0 - msssim)
            total = recon + self.lambda_bpp * bpp if self.loss_type == "rd" else recon
        return {"total": total, "recon_total": recon, "l1": l1, "1-msssim": 1.0 - msssim,
                "bpp": bpp, "msssim": msssim}
