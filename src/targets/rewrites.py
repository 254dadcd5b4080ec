"""Exact float rewrites that let NPU converters place the decoder's upsampling, and the graph forms per upsampling.

A stride-s ConvTranspose with kernel K, padding p and output padding q writes
output pixel ``o = s*i + k - p`` from input pixel ``i`` through tap ``k``, and
its output is ``s`` times its input when ``K + q - 2p == s`` (bmshj2018's
``deconv``: K=5, s=2, p=2, q=1). TensorFlow's SAME transposed convolution has
the same output size but crops its full output ``(K' - s) // 2`` pixels at the
start, so with K=5 it starts one pixel later than PyTorch: onnx2tf therefore
writes a VALID TRANSPOSE_CONV (output ``2*in + 3``) plus a crop, and Vela
refuses that shape ("Unsupported IFM/OFM shapes") and leaves the heaviest ops
of the decoder on the CPU.

``same_padded_convtranspose`` appends ``e = 2p + s - K`` zero taps at the end
of each kernel axis: a ``K' = 2p + s`` kernel with padding p and no output
padding maps every tap to the same output pixel (``o = s*i + k - p``, the
appended taps carry zeros), has output ``s*in``, and crops exactly p = (K' -
s) / 2 at the start, which is TensorFlow's SAME. Same function, sums in the
same order plus exact zeros; the converter writes one SAME TRANSPOSE_CONV.
The other route is ``src.codec.subpixel``'s sub-pixel convolution (Conv + DepthToSpace).

ECA's gate convolves the pooled channel vector with a 1-D kernel across channels, which the exported graph writes
as Shape -> Reshape (N, 1, C) -> Conv1d -> Reshape (N, C, 1, 1): shape arithmetic a converter must keep dynamic
(onnx2tf leaves a batch-dynamic Conv2D that TFLite's integer builtins refuse). ``BandedECAGate`` computes the same
gate as a 1x1 convolution from C to C channels whose weight is the banded (Toeplitz) matrix of the 1-D kernel:
``out[c] = sum_j w[j] * in[c + j - k//2]`` is row c of that matrix times the vector, the zero entries adding exact
zeros. Pool -> Conv 1x1 -> Clip -> Mul: no reshape, every op NPU-native.

CompressAI's GDN computes its non-negative beta and gamma from their parametrisation at every call and reshapes
gamma with the input's channel count, so the exported graph derives a convolution's weight at run time (Max, Pow,
Sub, Shape, Reshape), which onnx2tf cannot convert. ``ConstantGDN`` holds those values as the weight and bias of a
1x1 convolution: the same ``x * rsqrt(conv(x^2))`` (``sqrt`` for IGDN) with the same numbers. Its ``rsqrt`` is
written ``one / sqrt`` with ``one`` a (1, 1, 1, 1) constant: what ``torch.rsqrt`` exports to (Div(1, Sqrt), which
onnx2tf fuses into TFLite's RSQRT), but with a 4-D numerator, because onnx2tf fails on the scalar one when the
image is square ("Output tensors of a Functional model must be the output of a TensorFlow `Layer` ... Found: 1.0",
measured on the demo's GDN control at 512x512; 768x512 converted).

onnx2tf 1.29's Add converter ends with a "rescue guard" that compares the TensorFlow (NHWC) shape of the sum with
the ONNX (NCHW) shape, finds them different and transposes both operands to NCHW; the next op usually transposes
back by matching shapes, but when the channel count equals the feature map's height or width there is nothing to
match and a following TRANSPOSE_CONV reads the sum in the wrong layout (measured: the NPU blocks' decoder at
768x512, whose third block sums 128 channels of 128 x 192, converted with a max error of 2.3 on a [-2.9, 3.5] float
output; the first wrong tensor was the ConvTranspose after that sum). Only Add has that guard, so
``SubtractedResidual`` writes a decoder block's residual ``x + dw(.)`` as ``x - dw'(.)`` with dw' the negated
depthwise convolution: the same numbers (negation is exact), a SUB on the NPU instead of an ADD.
"""

from __future__ import annotations

import copy
from typing import Tuple

import torch
from compressai.layers import GDN
from torch import nn

from src.codec.subpixel import replace_modules, subpixel_rewrite
from src.npu_blocks import ECAGate, GDNishLiteDec, fold_gate

TARGET_UPSAMPLE = {
    "convtranspose": "each stride-2 ConvTranspose with its kernel zero-padded so converters write SAME "
                     "(same_padded_convtranspose)",
    "subpixel": "each stride-2 ConvTranspose as Conv + DepthToSpace (src.codec.subpixel)",
    "as_trained": "the ConvTransposes as trained (K=5, output padding 1): onnx2tf writes VALID + crop",
}


def can_pad_to_same(layer: nn.Module) -> bool:
    """A 2-D ConvTranspose (no groups, no dilation) whose output is ``stride`` x its input and whose kernel can grow
    to ``2p + s`` (on both axes)."""
    if type(layer) is not nn.ConvTranspose2d or layer.groups != 1 or tuple(layer.dilation) != (1, 1):
        return False
    for axis in (0, 1):
        k, s, p, q = layer.kernel_size[axis], layer.stride[axis], layer.padding[axis], layer.output_padding[axis]
        if k + q - 2 * p != s or 2 * p + s < k:
            return False
    return True


@torch.no_grad()
def same_padded_convtranspose(layer: nn.ConvTranspose2d) -> nn.ConvTranspose2d:
    """``layer`` with zero taps appended so that its kernel is ``2p + s`` and its output padding 0 (module docstring)."""
    if not can_pad_to_same(layer):
        raise ValueError(f"cannot pad {layer} to a SAME transposed convolution")
    size = tuple(2 * p + s for p, s in zip(layer.padding, layer.stride))
    padded = nn.ConvTranspose2d(layer.in_channels, layer.out_channels, size, stride=layer.stride,
                                padding=layer.padding, output_padding=0, bias=layer.bias is not None)
    padded = padded.to(layer.weight.device, layer.weight.dtype)
    padded.weight.zero_()
    k_h, k_w = layer.kernel_size
    padded.weight[:, :, :k_h, :k_w] = layer.weight
    if layer.bias is not None:
        padded.bias.copy_(layer.bias)
    return padded


def same_padded_rewrite(module: nn.Module) -> Tuple[nn.Module, int]:
    """A copy of ``module`` with every ``can_pad_to_same`` ConvTranspose2d padded; (copy, how many)."""
    return replace_modules(
        module, lambda child: can_pad_to_same(child)
        and tuple(child.kernel_size) != tuple(2 * p + s for p, s in zip(child.padding, child.stride)),
        lambda root, name, child: same_padded_convtranspose(child))


@torch.no_grad()
def banded_conv(conv1d: nn.Conv1d, channels: int) -> nn.Conv2d:
    """The 1x1 Conv2d (C -> C) that applies ``conv1d`` (1 -> 1 channel, odd kernel, same padding) across channels."""
    k = conv1d.kernel_size[0]
    if conv1d.in_channels != 1 or conv1d.out_channels != 1 or k % 2 == 0 or conv1d.padding[0] != k // 2:
        raise ValueError(f"cannot write {conv1d} as a banded 1x1 convolution")
    taps = conv1d.weight.reshape(k)
    matrix = conv1d.weight.new_zeros(channels, channels)
    for j in range(k):
        matrix += torch.diag(taps[j].expand(channels - abs(j - k // 2)), diagonal=j - k // 2)
    conv = nn.Conv2d(channels, channels, 1).to(conv1d.weight.device, conv1d.weight.dtype)
    conv.weight.copy_(matrix.reshape(channels, channels, 1, 1))
    conv.bias.fill_(float(conv1d.bias[0]) if conv1d.bias is not None else 0.0)
    return conv


class BandedECAGate(nn.Module):
    """``ECAGate`` as mean (``ECA_MEANS``) -> 1x1 banded conv -> Clip(0, 2) -> Mul (module docstring); its
    HardSigmoid folded into the clip as ``src.npu_blocks.fold_gate`` folds the blocks' gates."""

    def __init__(self, gate: ECAGate, channels: int, mean: str = "separable"):
        super().__init__()
        if mean not in ECA_MEANS:
            raise ValueError(f"ECA mean must be one of {sorted(ECA_MEANS)}, got {mean!r}")
        self.gated, self.mean = gate.gated, mean
        self.gate = fold_gate(banded_conv(gate.conv, channels), 0.0, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = separable_mean(x) if self.mean == "separable" else x.mean(dim=(2, 3), keepdim=True)
        return self.gated(x * self.gate(pooled))


ECA_MEANS = {
    "separable": "ECA's mean over H, then over W (separable_mean): Vela's limit on reduced elements per MEAN",
    "joint": "ECA's mean over H and W in one ReduceMean, as trained: RKNN-Toolkit2 inserts Transposes around the "
             "separable form's one-axis means",
}


def separable_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over H and W as a mean over H, then over W: the same value (sums in another order), but each
    reduction is one axis long. Vela places a 16-bit MEAN only up to 65536 reduced elements, and ECA's first pool
    at 768x512 reduces 384 x 256 = 98304 (on the U55 in 16x8 it fell back to the CPU: "Too many reduced elements")."""
    return x.mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)


def eca_channels(module: nn.Module, name: str) -> int:
    """The channel count an ECA gate sees: the output channels of the convolution its block projects with."""
    block = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    return block.project.out_channels


def banded_eca_rewrite(module: nn.Module, mean: str = "separable") -> Tuple[nn.Module, int]:
    """A copy of ``module`` with every ``ECAGate`` as a ``BandedECAGate`` pooling with ``mean``; (copy, how many)."""
    return replace_modules(module, lambda child: isinstance(child, ECAGate),
                           lambda root, name, child: BandedECAGate(child, eca_channels(root, name), mean))


class ConstantGDN(nn.Module):
    """GDN / IGDN with beta and gamma as a 1x1 convolution's constants: ``x * rsqrt(beta + gamma * x^2)``
    (``x * sqrt(...)`` inverse), as CompressAI's ``GDN.forward`` computes it."""

    def __init__(self, gdn: GDN):
        super().__init__()
        with torch.no_grad():
            beta, gamma = gdn.beta_reparam(gdn.beta), gdn.gamma_reparam(gdn.gamma)
        channels = beta.numel()
        self.inverse = gdn.inverse
        self.norm = nn.Conv2d(channels, channels, 1).to(beta.device, beta.dtype)
        with torch.no_grad():
            self.norm.weight.copy_(gamma.reshape(channels, channels, 1, 1))
            self.norm.bias.copy_(beta)
        self.register_buffer("one", torch.ones(1, 1, 1, 1, dtype=beta.dtype, device=beta.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm(x * x)
        return x * (torch.sqrt(norm) if self.inverse else self.one / torch.sqrt(norm))


def constant_gdn_rewrite(module: nn.Module) -> Tuple[nn.Module, int]:
    """A copy of ``module`` with every GDN / IGDN as a ``ConstantGDN``; (copy, how many)."""
    return replace_modules(module, lambda child: isinstance(child, GDN), lambda root, name, child: ConstantGDN(child))


def negated_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of ``conv`` computing ``-conv(x)``: weight and bias negated (exact)."""
    negated = copy.deepcopy(conv)
    with torch.no_grad():
        negated.weight.neg_()
        if negated.bias is not None:
            negated.bias.neg_()
    return negated


class SubtractedResidual(nn.Module):
    """A residual ``GDNishLiteDec`` whose ``dw`` is already negated, computed as ``x - dw(x * gain(x))`` (module
    docstring: onnx2tf mislays a residual Add's layout before a ConvTranspose; a Sub it converts right)."""

    def __init__(self, block: GDNishLiteDec):
        super().__init__()
        if not block.residual:
            raise ValueError("SubtractedResidual needs a residual GDNishLiteDec")
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        return b.summed(x - b.dw(b.gained(x * b.gain(x))))

    def export_form(self) -> nn.Module:
        """The block's own export form (gate folded into Conv + Clip), its dw still negated."""
        return SubtractedResidual(self.block.export_form())


def subtracted_residual_rewrite(module: nn.Module) -> Tuple[nn.Module, int]:
    """A copy of ``module`` with every residual ``GDNishLiteDec`` as a ``SubtractedResidual`` of itself with its
    ``dw`` negated; (copy, how many)."""
    def subtracted(root: nn.Module, name: str, block: GDNishLiteDec) -> SubtractedResidual:
        block.dw = negated_conv(block.dw)  # block belongs to replace_modules' copy
        return SubtractedResidual(block)

    return replace_modules(module, lambda child: isinstance(child, GDNishLiteDec) and child.residual, subtracted)

def target_model(model: nn.Module, upsample: str, eca_mean: str = "separable") -> nn.Module:
    """A copy of ``model`` in the form the NPU converters place: GDN's parameters as constants, ECA gates banded
    and pooling with ``eca_mean`` (``ECA_MEANS``, the target's own: ``src.targets.registry``), decoder residuals
    subtracted, g_s's upsampling as ``upsample`` (``TARGET_UPSAMPLE``). Every rewrite computes the same function
    in float."""
    if upsample not in TARGET_UPSAMPLE:
        raise ValueError(f"upsample must be one of {sorted(TARGET_UPSAMPLE)}, got {upsample!r}")
    rewritten = copy.copy(model)
    rewritten._modules = dict(model._modules)
    rewritten.g_a = banded_eca_rewrite(constant_gdn_rewrite(model.g_a)[0], eca_mean)[0]
    g_s = subtracted_residual_rewrite(banded_eca_rewrite(constant_gdn_rewrite(model.g_s)[0], eca_mean)[0])[0]
    if upsample != "as_trained":
        g_s = (same_padded_rewrite if upsample == "convtranspose" else subpixel_rewrite)(g_s)[0]
    rewritten.g_s = g_s
    return rewritten
