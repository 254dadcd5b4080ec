"""Stride-s ConvTranspose as a convolution followed by DepthToSpace (sub-pixel convolution), with the same weights.

A transposed convolution with stride ``s`` writes output pixel ``o = s*i + k - p``
from input pixel ``i`` through kernel tap ``k``. Split the output by phase
``o = s*m + a`` (``0 <= a < s``): phase ``a`` only ever sees the taps
``k = a + p - s*d`` applied to input pixel ``m + d``. So each phase is an
ordinary convolution over the input, with its own kernel cut out of the
transposed one, and DepthToSpace interleaves the ``s*s`` phases (Shi et al.,
"Real-Time Single Image and Video Super-Resolution Using an Efficient
Sub-Pixel Convolutional Neural Network", CVPR 2016)::

    ConvTranspose2d(Cin, Cout, K, stride=s, padding=p, output_padding=q)
        == PixelShuffle(s)(Conv2d(Cin, Cout*s*s, K', padding=r))

when the output is exactly ``s`` times the input (``K + q - 2p == s``). For
bmshj2018-factorized's ``deconv`` (K=5, s=2, p=2, q=1) that is a 3x3
convolution with padding 1 and a quarter of its taps zero. Why: integer NPU
toolchains (and onnxruntime's CPU provider, which runs a QDQ ConvTranspose
as dequantise -> float -> quantise) quantise Conv everywhere, transposed
convolution only under constraints. The rewrite changes the order of the
float sums only, so in FP32 it agrees with the original to rounding.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Tuple

import torch
from torch import nn

UPSAMPLE_MODES = ("convtranspose", "subpixel")


class SubPixelConv(nn.Module):
    """Conv2d to ``Cout * s * s`` channels, then PixelShuffle(s) (ONNX DepthToSpace, CRD order)."""

    def __init__(self, conv: nn.Conv2d, scale: int):
        super().__init__()
        self.conv, self.shuffle = conv, nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


def _tap_offsets(kernel: int, stride: int, padding: int) -> Tuple[int, int]:
    """The input offsets d (over all phases) whose tap ``a + p - s*d`` lies in the kernel: (d_min, d_max)."""
    d_min = min(math.ceil((a + padding - kernel + 1) / stride) for a in range(stride))
    d_max = max((a + padding) // stride for a in range(stride))
    return d_min, d_max


def can_rewrite(layer: nn.Module) -> bool:
    """A 2-D ConvTranspose (no groups, no dilation) whose output is exactly ``stride`` times its input."""
    if type(layer) is not nn.ConvTranspose2d or layer.groups != 1 or tuple(layer.dilation) != (1, 1):
        return False
    for axis in (0, 1):
        k, s, p, q = (layer.kernel_size[axis], layer.stride[axis], layer.padding[axis],
                      layer.output_padding[axis])
        if k + q - 2 * p != s:
            return False
    return layer.stride[0] == layer.stride[1]


@torch.no_grad()
def subpixel_from_convtranspose(layer: nn.ConvTranspose2d) -> SubPixelConv:
    """The sub-pixel convolution that computes ``layer`` (see the module docstring for the tap mapping)."""
    if not can_rewrite(layer):
        raise ValueError(f"cannot rewrite {layer} as a sub-pixel convolution")
    s = layer.stride[0]
    c_in, c_out = layer.in_channels, layer.out_channels
    # A centred kernel that holds every offset any phase uses (taps outside a phase's set stay zero).
    radius = [max(abs(d) for d in _tap_offsets(layer.kernel_size[axis], s, layer.padding[axis])) for axis in (0, 1)]
    size = (2 * radius[0] + 1, 2 * radius[1] + 1)
    weight = layer.weight.new_zeros(c_out, s, s, c_in, *size)  # (Cout, phase_y, phase_x, Cin, kH', kW')
    source = layer.weight.permute(1, 0, 2, 3)  # (Cout, Cin, K, K)
    for a in range(s):
        for dy in range(-radius[0], radius[0] + 1):
            ky = a + layer.padding[0] - s * dy
            if not 0 <= ky < layer.kernel_size[0]:
                continue
            for b in range(s):
                for dx in range(-radius[1], radius[1] + 1):
                    kx = b + layer.padding[1] - s * dx
                    if 0 <= kx < layer.kernel_size[1]:
                        weight[:, a, b, :, dy + radius[0], dx + radius[1]] = source[:, :, ky, kx]
    conv = nn.Conv2d(c_in, c_out * s * s, size, padding=tuple(radius), bias=layer.bias is not None)
    conv = conv.to(layer.weight.device, layer.weight.dtype)
    conv.weight.copy_(weight.reshape(c_out * s * s, c_in, *size))
    if layer.bias is not None:
        conv.bias.copy_(layer.bias.repeat_interleave(s * s))
    return SubPixelConv(conv, s)


def replace_modules(module: nn.Module, matches: Callable[[nn.Module], bool],
                    replacement: Callable[[nn.Module, str, nn.Module], nn.Module]) -> Tuple[nn.Module, int]:
    """A copy of ``module`` with each submodule ``child`` (named ``name``) that ``matches`` replaced by
    ``replacement(copy, name, child)``; (copy, how many). The rewrites of this module and of src.targets.rewrites."""
    module = copy.deepcopy(module)
    found = [(name, child) for name, child in module.named_modules() if name and matches(child)]
    for name, child in found:
        module.set_submodule(name, replacement(module, name, child))
    return module, len(found)


def subpixel_rewrite(module: nn.Module) -> Tuple[nn.Module, int]:
    """A copy of ``module`` with every rewritable ConvTranspose2d replaced; (copy, how many were replaced)."""
    return replace_modules(module, can_rewrite, lambda root, name, child: subpixel_from_convtranspose(child))
