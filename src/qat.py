"""Quantisation-aware training (QAT) of the transforms that run on the NPU: ``g_a`` and ``g_s``.

The entropy model stays in float on the host; the encoder and decoder are
what an integer NPU runs. QAT trains them with the rounding of the INT8
graph they will be exported to, using PyTorch's own fake-quant modules and
observers (``torch.ao.quantization.FakeQuantize``, moving-average min/max):

- weights of every convolution: INT8, symmetric, one scale per output
  channel (axis 0 for Conv, axis 1 for ConvTranspose), zero point 0, range
  [-128, 127] (PyTorch's default per-channel weight scheme; ONNX's
  QuantizeLinear takes no narrower signed range);
- activations: UINT8, affine, one scale per tensor, as ``onnxruntime``'s
  static quantiser writes them for PTQ: the input of each transform and the
  output of every convolution, activation, pooling, GDN and every
  ``QuantPoint`` (the products, gains and residual sums inside the NPU blocks).

Weights are fake-quantised through ``torch.nn.utils.parametrize`` (one
mechanism for Conv1d/2d and ConvTranspose2d), activations through forward
hooks, as torch.ao's eager mode does. The fake-quant modules are ordinary
submodules, so their scales, zero points and observer states are in the
state dict: a QAT checkpoint carries its learned scales, and export writes a
QDQ graph with exactly those (``torch.onnx`` turns each fake-quant into a
QuantizeLinear/DequantizeLinear pair).

Phases (the engine drives them): right after the swap QAT is off (the network
computes in float); ``calibrate`` runs ``--qat_calib_steps`` training batches
with the observers on, then switches fake-quant on; the observers keep
following the activations until ``--qat_freeze_after`` steps, then the scales
are frozen. Observers only ever update in train mode: validation, eval and
export quantise with the scales as they stand.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
from compressai.layers import GDN
from torch import nn
from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
                                   disable_fake_quant, disable_observer, enable_fake_quant, enable_observer)
from torch.nn.utils import parametrize

from src.data import to_unit_float
from src.npu_blocks import QuantPoint

QAT_PARTS = ("g_a", "g_s")
# The one scheme, stored in the architecture description of a QAT checkpoint.
QAT_SCHEME: Dict[str, Any] = {
    "parts": list(QAT_PARTS),
    "weights": "int8 per-channel symmetric [-128, 127]",
    "activations": "uint8 per-tensor affine [0, 255]",
    "observer": "moving-average min/max (averaging 0.01)",
}
_WEIGHT_AXIS = {nn.Conv1d: 0, nn.Conv2d: 0, nn.ConvTranspose2d: 1}
# Modules whose output an INT8 graph carries as a quantised tensor.
_QUANTISED_OUTPUTS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.ReLU, nn.ReLU6, nn.Hardsigmoid, nn.Hardswish,
                      nn.AdaptiveAvgPool2d, GDN, QuantPoint)


class TrainingFakeQuantize(FakeQuantize):
    """torch.ao's ``FakeQuantize``, whose observer updates in train mode only.

    Plain ``FakeQuantize`` observes whenever its observer is enabled, so a
    validation pass or an export would move the scales. In eval mode this one
    fake-quantises with the scales it holds (or passes through while
    fake-quant is off), which is also the trace ``torch.onnx`` exports.
    """

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if X.dtype != torch.float32:
            # Under bf16/fp16 autocast: observe and round in float32 (not every backend's fake-quant kernel takes
            # low-precision inputs), hand the grid values back in the input's dtype.
            return self.forward(X.float()).to(X.dtype)
        if self.training:
            return super().forward(X)
        if not self.fake_quant_enabled[0] == 1:
            return X
        qmin, qmax = self.activation_post_process.quant_min, self.activation_post_process.quant_max
        if self.is_per_channel:
            return torch.fake_quantize_per_channel_affine(X, self.scale, self.zero_point, self.ch_axis, qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, qmin, qmax)


def weight_fake_quant(ch_axis: int) -> TrainingFakeQuantize:
    return TrainingFakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                                dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=ch_axis)


def activation_fake_quant() -> TrainingFakeQuantize:
    return TrainingFakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                dtype=torch.quint8, qscheme=torch.per_tensor_affine)


def _quantise_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return module.output_fake_quant(output)


def _quantise_input(module: nn.Module, inputs: tuple) -> tuple:
    return (module.input_fake_quant(inputs[0]), *inputs[1:])


def prepare_qat(model: nn.Module, parts: Iterable[str] = QAT_PARTS) -> nn.Module:
    """Insert weight and activation fake-quant into ``parts`` of ``model``, in place; QAT starts off.

    Each weight observer sees its weight once here, so the per-channel scale
    buffers have their final shape (a QAT state dict then loads strictly).
    """
    for part_name in parts:
        part = getattr(model, part_name)
        # The input's fake-quant sits on the first layer: a child added to an nn.Sequential would run as a layer.
        first = part[0] if isinstance(part, nn.Sequential) else part
        first.input_fake_quant = activation_fake_quant()
        first.register_forward_pre_hook(_quantise_input)
        for module in list(part.modules()):
            if type(module) in _WEIGHT_AXIS:
                fake_quant = weight_fake_quant(_WEIGHT_AXIS[type(module)])
                with torch.no_grad():
                    fake_quant(module.weight.detach())
                parametrize.register_parametrization(module, "weight", fake_quant)
            if isinstance(module, _QUANTISED_OUTPUTS):
                module.output_fake_quant = activation_fake_quant()
                module.register_forward_hook(_quantise_output)
    set_qat_mode(model, observe=False, fake_quant=False)
    return model


def fake_quant_modules(model: nn.Module) -> List[FakeQuantize]:
    return [m for m in model.modules() if isinstance(m, FakeQuantize)]


def is_qat_model(model: nn.Module) -> bool:
    return bool(fake_quant_modules(model))


def set_qat_mode(model: nn.Module, observe: Optional[bool] = None, fake_quant: Optional[bool] = None) -> None:
    """Switch the observers and/or fake-quant of every fake-quant module (None leaves it as it is)."""
    if observe is not None:
        model.apply(enable_observer if observe else disable_observer)
    if fake_quant is not None:
        model.apply(enable_fake_quant if fake_quant else disable_fake_quant)


def qat_state(model: nn.Module) -> str:
    """'off', 'calibrating', 'training (observing)' or 'frozen scales', read from the modules' flags."""
    modules = fake_quant_modules(model)
    if not modules:
        return "off"
    observing = any(bool(m.observer_enabled[0]) for m in modules)
    quantising = any(bool(m.fake_quant_enabled[0]) for m in modules)
    if not quantising:
        return "calibrating" if observing else "off"
    return "training (observing)" if observing else "frozen scales"


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Optional[torch.Tensor]], steps: int, device: torch.device,
              autocast: Callable) -> int:
    """Observe ``steps`` loader batches (uint8) in train mode (no update), then switch fake-quant on; returns batches seen."""
    model.train()
    set_qat_mode(model, observe=True, fake_quant=False)
    seen = 0
    for x in batches:
        if seen >= steps:
            break
        if x is None:
            continue
        with autocast():
            model(to_unit_float(x, device))
        seen += 1
    set_qat_mode(model, fake_quant=True)
    return seen


@contextlib.contextmanager
def float_weights_and_activations(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the QAT model computes in float ("its FP32 self"); its flags are restored after."""
    modules = fake_quant_modules(model)
    saved = [m.fake_quant_enabled.clone() for m in modules]
    set_qat_mode(model, fake_quant=False)
    try:
        yield model
    finally:
        for module, flag in zip(modules, saved):
            module.fake_quant_enabled.copy_(flag)


def output_step(model: nn.Module, transform: str) -> Optional[float]:
    """The quantisation step of ``transform``'s output in a QAT model (None for a float model)."""
    last = list(getattr(model, transform).children())[-1]
    fake_quant = getattr(last, "output_fake_quant", None)
    return float(fake_quant.scale) if fake_quant is not None else None
