"""NPU-friendly stand-ins for GDN (encoder) and IGDN (decoder).

GDN computes ``y[i] = x[i] / sqrt(beta[i] + sum_j gamma[j, i] * x[j]^2)``: a
divisive, channel-coupled normalisation that integer NPUs cannot run (division
and square root do not quantise to INT8). The blocks here keep what GDN is good
at -- cross-channel mixing and an input-dependent gain -- using only 1x1 and
depthwise convolutions, multiplications and piecewise-linear functions
(ReLU6, HardSigmoid, HardSwish), all of which INT8 toolchains support.

Both blocks can start as the exact identity map (``init_identity=True``), so
swapping them in for GDN changes nothing but the removal of GDN itself and
fine-tuning starts from the pretrained network's own features.

Each block also says what it is to the rest of the project, so that a new
option is one edit here (as torchvision's quantizable blocks carry their own
``fuse_model``):

- ``OPTIONS``: its constructor options that the NPU script exposes as flags
  (``src.train_args`` adds one flag per entry, the architecture description
  stores them, ``options()`` fills in the defaults);
- ``quant_points()``: the tensors an INT8 graph quantises inside it, where
  quantisation-aware training puts its fake-quant (``src.quant.fake_quant``);
  the last one is the block's output, on the main path (16 bits in ``a16w8``);
- ``GRAPH_OPS`` / ``FOLDED_GATES``: which op of the exported graph writes which
  of those tensors (``src.quant.qat.graph_site``);
- ``export_form()``: the same function with each HardSigmoid gate folded into
  the convolution before it (Conv + Clip, one quantised node in every QDQ
  toolchain; onnxruntime leaves HardSigmoid in float).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

ACTIVATIONS = {"relu6": nn.ReLU6, "hardswish": nn.Hardswish}

# ReLU6 saturates at 6: the identity init feeds it x * 2**-6, which is exact
# in floating point and keeps |x| < 384 inside the linear range.
_RELU6_IDENTITY_SCALE = 2.0 ** -6
# HardSwish is linear above 3: the second activation's input is offset by this.
_HSWISH_IDENTITY_OFFSET = 4.0


@dataclass(frozen=True)
class BlockOption:
    """A constructor option of a block that the NPU script exposes as ``--{flag}``."""

    flag: str  # the flag, without the dashes
    kwarg: str  # the constructor's argument
    type: Callable[[str], Any]  # bool flags read true/false
    default: Any
    help: str


def _options(cls: type, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``given`` with every ``cls.OPTIONS`` default filled in (other constructor arguments kept as given)."""
    return {**{o.kwarg: o.default for o in cls.OPTIONS}, **dict(given or {})}


def _no_batchnorm(*norms: nn.Module) -> None:
    if not all(isinstance(n, nn.Identity) for n in norms):
        raise ValueError("QAT does not support BatchNorm in the NPU blocks")


class ClippedConvGate(nn.Module):
    """``Clip(conv(x), low, high)``: an NPU block's HardSigmoid gate folded into the convolution before it."""

    def __init__(self, conv: nn.Module, low: float, high: float):
        super().__init__()
        self.conv, self.low, self.high = conv, low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.conv(x), self.low, self.high)


def fold_gate(conv: nn.Module, offset: float, span: float) -> ClippedConvGate:
    """``offset + span * HardSigmoid(conv(x))`` as ``Clip(conv'(x), offset, offset + span)``.

    HardSigmoid(z) = clip(z / 6 + 1/2, 0, 1), so the whole is
    clip(conv(x) * span / 6 + offset + span / 2, offset, offset + span): conv'
    has weights * span / 6 and bias * span / 6 + offset + span / 2 (exact in real arithmetic).
    """
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.mul_(span / 6.0)
        folded.bias.mul_(span / 6.0).add_(offset + span / 2.0)
    return ClippedConvGate(folded, offset, offset + span)


def _check_odd_kernel(name: str, k: int) -> None:
    if not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer, got {k!r}")


def _check_act(act_type: str) -> None:
    if act_type not in ACTIVATIONS:
        raise ValueError(f"act_type must be one of {sorted(ACTIVATIONS)}, got {act_type!r}")


def _check_channels(channels: int) -> None:
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")


class QuantPoint(nn.Identity):
    """Marks a tensor that an INT8 graph carries between ops (a product, a gain, a residual sum).

    The identity in float (no weights, nothing in the state dict);
    quantisation-aware training (src/quant/fake_quant.py) fake-quantises its output, as it
    does the outputs of convolutions and activations.
    """


class ECAGate(nn.Module):
    """Efficient Channel Attention with a piecewise-linear gate.

    ``x * 2 * HardSigmoid(conv1d(mean_hw(x)))``: the usual ECA uses a sigmoid
    (an Exp on an NPU); HardSigmoid is piecewise linear. The factor 2 puts the
    gate's range at [0, 2] and makes a zero-initialised conv give a gate of
    exactly 1 while still passing gradients (HardSigmoid's slope at 0 is 1/6).
    """

    def __init__(self, kernel_size: int = 3, init_identity: bool = True):
        super().__init__()
        _check_odd_kernel("eca_kernel", kernel_size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=True)
        self.gate = nn.Hardsigmoid()
        self.gated = QuantPoint()
        if init_identity:
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    GRAPH_OPS = {"Mul": "gated"}  # exported op (inside the gate's scope) -> the QuantPoint whose tensor it writes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        pooled = self.pool(x).reshape(n, 1, c)
        gain = 2.0 * self.gate(self.conv(pooled)).reshape(n, c, 1, 1)
        return self.gated(x * gain)

    def quant_points(self) -> List[Tuple[str, float]]:
        """(submodule, factor) of each tensor the INT8 graph quantises: the pooled means, the gain (the graph's
        ``Clip(conv', 0, 2)`` is 2x the HardSigmoid's output, hence factor 2) and the gated product."""
        return [("pool", 1.0), ("gate", 2.0), ("gated", 1.0)]

    def export_form(self) -> nn.Module:
        return ExportECAGate(self)


class ExportECAGate(nn.Module):
    """``ECAGate`` with its gate ``2 * HardSigmoid(conv1d(.))`` as ``Clip(conv1d'(.), 0, 2)``."""

    def __init__(self, gate: ECAGate):
        super().__init__()
        self.pool, self.gated = gate.pool, gate.gated
        self.gate = fold_gate(gate.conv, 0.0, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        gain = self.gate(self.pool(x).reshape(n, 1, c)).reshape(n, c, 1, 1)
        return self.gated(x * gain)


class GDNishLiteEnc(nn.Module):
    """Encoder-side GDN replacement.

    ``1x1 conv (C->tC) -> act -> depthwise k_dw x k_dw -> act -> 1x1 conv (tC->C) -> [ECA] -> [+ input]``

    The expansion mixes channels (GDN's coupling), the depthwise conv adds the
    spatial context GDN lacks, ECA supplies a per-image channel gain.

    Identity at init:
    - ``residual=True``: the last 1x1 conv starts at zero, so the branch adds 0.
    - ``residual=False``: the block itself must carry x through two
      activations. Each input channel gets two hidden channels holding +x and
      -x. For ReLU6 they are fed ``+-x * 2**-6`` (inside the linear range for
      |x| < 384); both activations then pass them unchanged and the last conv
      computes ``(h+ - h-) * 2**6 = x`` exactly. For HardSwish the identity
      ``hswish(z) - hswish(-z) = z`` (true for every z) handles the first
      activation; the depthwise bias lifts the second activation's input above 3
      where HardSwish is linear, and the offset cancels in ``h+ - h-``. This needs
      ``round(t*C) >= 2*C`` hidden channels. ECA starts with a gate of exactly 1.
    """

    OPTIONS = (
        BlockOption("enc_t", "t", float, 2.0, "GDNishLiteEnc expansion ratio"),
        BlockOption("enc_kdw", "k_dw", int, 3, "GDNishLiteEnc depthwise kernel"),
        BlockOption("enc_eca", "use_eca", bool, True, "GDNishLiteEnc channel attention"),
        BlockOption("enc_residual", "residual", bool, True, "GDNishLiteEnc residual connection"),
        BlockOption("enc_eca_kernel", "eca_kernel", int, 3,
                    "GDNishLiteEnc ECA's 1-D kernel: how many neighbouring channels set each channel's gain"),
    )
    GRAPH_OPS = {"Add": "summed"}

    def __init__(self, channels: int, t: float = 2.0, k_dw: int = 3, use_eca: bool = True,
                 residual: bool = True, eca_kernel: int = 3, init_identity: bool = True,
                 act_type: str = "relu6", bn: bool = False):
        super().__init__()
        _check_channels(channels)
        if not t > 0:
            raise ValueError(f"t must be > 0, got {t!r}")
        _check_odd_kernel("k_dw", k_dw)
        _check_act(act_type)
        hidden = max(1, int(round(t * channels)))
        if init_identity and not residual:
            if hidden < 2 * channels:
                raise ValueError(f"t must be >= 2 for init_identity=True with residual=False, got {t!r}")
            if bn:
                raise ValueError("bn=True cannot start as the identity without residual; set residual=True")
        self.channels, self.hidden, self.residual = channels, hidden, residual
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden) if bn else nn.Identity()
        self.act1 = ACTIVATIONS[act_type]()
        self.dw = nn.Conv2d(hidden, hidden, k_dw, padding=k_dw // 2, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden) if bn else nn.Identity()
        self.act2 = ACTIVATIONS[act_type]()
        self.project = nn.Conv2d(hidden, channels, 1)
        self.eca = ECAGate(eca_kernel, init_identity=init_identity) if use_eca else nn.Identity()
        self.summed = QuantPoint()
        if init_identity:
            self._init_identity(act_type)

    @torch.no_grad()
    def _init_identity(self, act_type: str) -> None:
        if self.residual:
            nn.init.zeros_(self.project.weight)
            nn.init.zeros_(self.project.bias)
            return
        c, k = self.channels, self.dw.kernel_size[0]
        scale = _RELU6_IDENTITY_SCALE if act_type == "relu6" else 1.0
        eye = torch.eye(c)
        for conv in (self.expand, self.dw, self.project):
            conv.weight.zero_()
            conv.bias.zero_()
        self.expand.weight[:c, :, 0, 0] = eye * scale
        self.expand.weight[c:2 * c, :, 0, 0] = -eye * scale
        self.dw.weight[:, 0, k // 2, k // 2] = 1.0
        if act_type == "hardswish":
            self.dw.bias[:2 * c] = _HSWISH_IDENTITY_OFFSET
        self.project.weight[:, :c, 0, 0] = eye / scale
        self.project.weight[:, c:2 * c, 0, 0] = -eye / scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.expand(x)))
        h = self.act2(self.bn2(self.dw(h)))
        out = self.eca(self.project(h))
        return self.summed(x + out) if self.residual else out

    @classmethod
    def options(cls, given: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """The constructor options ``given``, with the defaults of every ``OPTIONS`` entry filled in."""
        return _options(cls, given)

    def quant_points(self) -> List[Tuple[str, float]]:
        """(submodule, factor) of each tensor the INT8 graph quantises, in order; the last is the block's output.

        Each convolution is fused with the activation after it (quantised once, on the activation's output); the
        projection feeds ECA or the residual sum, so it is quantised itself.
        """
        _no_batchnorm(self.bn1, self.bn2)
        points = [("act1", 1.0), ("act2", 1.0), ("project", 1.0)]
        if isinstance(self.eca, ECAGate):
            points += [(f"eca.{name}", factor) for name, factor in self.eca.quant_points()]
        return points + ([("summed", 1.0)] if self.residual else [])

    def double_rounding_points(self) -> List[str]:
        """The convolutions before an activation: where the ``double`` ablation rounds once more than the graph."""
        return ["expand", "dw"]


class GDNishLiteDec(nn.Module):
    """Decoder-side IGDN replacement.

    ``1x1 conv -> act -> per-channel 1x1 (scale predictor) -> HardSigmoid ->
    rescale to [g_min, g_max] -> x * gain -> depthwise k x k -> [+ input]``

    IGDN multiplies each channel by an input-dependent factor; here that factor
    is predicted by cheap convolutions and bounded to [g_min, g_max], so it can
    never blow up or reach zero (no division anywhere).

    Identity at init: the scale predictor starts with zero weights and the bias
    for which the gain is exactly 1 (this needs g_min < 1 < g_max, checked when
    ``residual=False``). With ``residual=True`` the depthwise conv starts at
    zero (the branch adds 0); without it, it starts as a centred delta kernel.
    """

    OPTIONS = (
        BlockOption("dec_k", "k", int, 3, "GDNishLiteDec depthwise kernel"),
        BlockOption("dec_gmin", "g_min", float, 0.5, "GDNishLiteDec minimum gain"),
        BlockOption("dec_gmax", "g_max", float, 2.0, "GDNishLiteDec maximum gain"),
        BlockOption("dec_residual", "residual", bool, True, "GDNishLiteDec residual connection"),
    )
    GRAPH_OPS = {"Mul": "gained", "Add": "summed"}
    FOLDED_GATES = {"scale": "gain_out"}  # in the export form the gate is a Clip on this conv: its tensor is gain_out

    def __init__(self, channels: int, k: int = 3, g_min: float = 0.5, g_max: float = 2.0,
                 residual: bool = True, act_type: str = "relu6", use_bn: bool = False,
                 init_identity: bool = True):
        super().__init__()
        _check_channels(channels)
        _check_odd_kernel("k", k)
        _check_act(act_type)
        if not g_min < g_max:
            raise ValueError(f"g_min must be < g_max, got g_min={g_min!r}, g_max={g_max!r}")
        if g_min < 0:
            raise ValueError(f"g_min must be >= 0, got {g_min!r}")
        if init_identity and not residual and not g_min < 1.0 < g_max:
            raise ValueError(f"init_identity with residual=False needs g_min < 1 < g_max, got [{g_min}, {g_max}]")
        self.g_min, self.g_max, self.residual = float(g_min), float(g_max), residual
        self.mix = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels) if use_bn else nn.Identity()
        self.act = ACTIVATIONS[act_type]()
        self.scale = nn.Conv2d(channels, channels, 1, groups=channels)
        self.gate = nn.Hardsigmoid()
        self.gain_out = QuantPoint()
        self.gained = QuantPoint()
        self.dw = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)
        self.summed = QuantPoint()
        if init_identity:
            self._init_identity()

    @torch.no_grad()
    def _init_identity(self) -> None:
        # HardSigmoid(z) = z/6 + 1/2 on (-3, 3): solve g_min + (g_max-g_min)*HardSigmoid(z) = 1.
        unit_fraction = min(max((1.0 - self.g_min) / (self.g_max - self.g_min), 0.0), 1.0)
        self.scale.weight.zero_()
        self.scale.bias.fill_(6.0 * (unit_fraction - 0.5))
        self.dw.weight.zero_()
        self.dw.bias.zero_()
        if not self.residual:
            k = self.dw.kernel_size[0]
            self.dw.weight[:, 0, k // 2, k // 2] = 1.0

    def gain(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale(self.act(self.bn(self.mix(x))))
        gate = self.gate(z)
        # The export form's range is [0, 1] already (its clip is the gate): no Mul by 1 and Add of 0 in its graph
        # (onnx2tf turned that Mul into a bare 1.0 on square feature maps and stopped: "Output tensors of a
        # Functional model must be the output of a TensorFlow `Layer` ... Found: 1.0"). 0 + 1 * g is g exactly.
        if (self.g_min, self.g_max) != (0.0, 1.0):
            gate = self.g_min + (self.g_max - self.g_min) * gate
        return self.gain_out(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dw(self.gained(x * self.gain(x)))
        return self.summed(x + out) if self.residual else out

    @classmethod
    def options(cls, given: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """The constructor options ``given``, with the defaults of every ``OPTIONS`` entry filled in."""
        return _options(cls, given)

    def quant_points(self) -> List[Tuple[str, float]]:
        """(submodule, factor) of each tensor the INT8 graph quantises, in order; the last is the block's output."""
        _no_batchnorm(self.bn)
        points = [("act", 1.0), ("gain_out", 1.0), ("gained", 1.0), ("dw", 1.0)]
        return points + ([("summed", 1.0)] if self.residual else [])

    def double_rounding_points(self) -> List[str]:
        return ["mix"]

    def export_form(self) -> nn.Module:
        """A copy whose gain is ``Clip(scale'(z), g_min, g_max)``: its range is [0, 1] and ``gain()`` is the clip."""
        folded = copy.deepcopy(self)
        folded.scale, folded.gate = fold_gate(self.scale, self.g_min, self.g_max - self.g_min), nn.Identity()
        folded.g_min, folded.g_max = 0.0, 1.0
        return folded
