"""QAT's torch side: the fake-quant modules, where they sit (the sites), and the model-level operations on them.

Torch only (no onnx, no onnxruntime): the model factory builds a QAT model
(``prepare_qat``) with this module alone. How the sites are found in the exported graph, and how
calibration and export run, is ``src.quant.qat`` (the onnx side).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase
from torch.nn.utils import parametrize

from src.quant.scheme import LOG_SCALE_GAIN, QAT_PARTS, normalise_scheme

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # onnxruntime's symmetric INT8 weight range
_FUSED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)
_WEIGHT_AXIS = {nn.Conv1d: 0, nn.Conv2d: 0, nn.ConvTranspose2d: 1}
INPUT = ":in"


# ---------------------------------------------------------------- fake-quant modules


class FrozenFakeQuantize(FakeQuantizeBase):
    """Per-tensor affine fake-quant with fixed scale and zero point (buffers), set by ``calibrate``."""

    def __init__(self, quant_min: int, quant_max: int):
        super().__init__()
        self.quant_min, self.quant_max = quant_min, quant_max
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))
        self.disable_observer()
        self.disable_fake_quant()

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled[0]:
            return X
        return torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def calculate_qparams(self):
        return self.scale, self.zero_point

    def set_qparams(self, scale: float, zero_point: int) -> None:
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)


class LearnedFakeQuantize(FakeQuantizeBase):
    """LSQ fake-quant whose scale is learnt in log space: ``scale = exp(LOG_SCALE_GAIN * log_scale)``.

    The rounding and its gradients (LSQ's: the straight-through estimator
    inside the range, the clipping gradient outside) are torch's learnable
    per-tensor fake-quant op; the zero point is a parameter too, rounded
    on export. Why log space: Adam moves every parameter by about the
    learning rate per step whatever its gradient's size, so a scale learnt
    as itself moves by the same *absolute* amount at every site. Measured on
    the study's q2 model (lr 3e-5, 320 steps): the scales of 1e-4 to 1e-3
    (ECA pools and products, the decoder's depthwise outputs) moved by -91 %
    to +426 %, those near 2e-2 by -10 % to +7 %. A step in ``log_scale`` is the same
    *fraction* of every scale: about ``LOG_SCALE_GAIN * lr`` per step (9e-4
    at lr 3e-5). LSQ's gradient scale 1/sqrt(N * Qp) is left out: it
    balances the scale's step against the weights' under SGD, and Adam
    divides it out again. (``--weight_decay`` > 0 would also pull
    ``log_scale`` towards 0, i.e. the scale towards 1; the recipe's default is 0.)
    """

    def __init__(self, quant_min: int, quant_max: int):
        super().__init__()
        self.quant_min, self.quant_max = quant_min, quant_max
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.zero_point = nn.Parameter(torch.zeros(1))
        self.disable_observer()
        self.disable_fake_quant()

    @property
    def scale(self) -> torch.Tensor:
        return torch.exp(LOG_SCALE_GAIN * self.log_scale)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled[0]:
            return X
        return torch._fake_quantize_learnable_per_tensor_affine(X, self.scale, self.zero_point, self.quant_min,
                                                                self.quant_max, 1.0)

    def set_qparams(self, scale: float, zero_point: int) -> None:
        with torch.no_grad():
            self.log_scale.fill_(float(np.log(scale)) / LOG_SCALE_GAIN)
            self.zero_point.fill_(float(zero_point))

    def calculate_qparams(self):
        zero_point = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max).int()
        return self.scale.detach(), zero_point


class WeightFakeQuant(nn.Module):
    """INT8 per output channel, symmetric, scale = |w|max / 127: what ``quantize_static`` does to the weights."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis
        self.register_buffer("fake_quant_enabled", torch.tensor([0], dtype=torch.uint8))  # on at calibration

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled[0]:
            return weight
        dims = [d for d in range(weight.dim()) if d != self.axis]
        scale = (weight.detach().abs().amax(dim=dims).float() / WEIGHT_QMAX).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight.float(), scale, zero, self.axis, WEIGHT_QMIN,
                                                      WEIGHT_QMAX).to(weight.dtype)


def _fake_quant(site_fq: nn.Module, x: torch.Tensor, factor: float) -> torch.Tensor:
    dtype = x.dtype  # under bf16/fp16 autocast: round in float32, hand the grid values back in the input's dtype
    x = x.float()
    return (site_fq(x * factor) / factor if factor != 1.0 else site_fq(x)).to(dtype)


def _quantise_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return _fake_quant(module.output_fake_quant, output, module.output_fake_quant_factor)


def _quantise_input(module: nn.Module, inputs: tuple) -> tuple:
    return (_fake_quant(module.input_fake_quant, inputs[0], 1.0), *inputs[1:])


# ---------------------------------------------------------------- where the exported graph quantises


@dataclass(frozen=True)
class Site:
    """A tensor the INT8 graph quantises: a module's output (or, ``name`` ending in ':in', a transform's input).

    ``factor``: the graph's tensor is ``factor`` times the module's output (2 for ECA's gate).
    ``stage``: on the main path (16 bits in ``a16w8``, as ``src.quant.ptq.stage_outputs``).
    """
    name: str
    factor: float = 1.0
    stage: bool = False
    in_graph: bool = True  # False: an ablation's extra rounding, which the exported graph does not have


def _block_sites(path: str, block: nn.Module, double: bool) -> List[Site]:
    """The sites of an NPU block: its own ``quant_points()`` (``src.npu_blocks``), the last one its output (main path).
    With ``double``, also the ablation's ``double_rounding_points()``, which the exported graph does not round."""
    if not hasattr(block, "quant_points"):
        raise ValueError(f"{path}: QAT quantises convolutions, ReLU/ReLU6 and the NPU blocks, not "
                         f"{type(block).__name__} (swap every GDN first)")
    try:
        points = block.quant_points()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    extra = [Site(f"{path}.{name}", in_graph=False) for name in block.double_rounding_points()] if double else []
    sites = [Site(f"{path}.{name}", factor) for name, factor in points]
    return extra + sites[:-1] + [Site(sites[-1].name, sites[-1].factor, stage=True)]


def qat_sites(model: nn.Module, parts: Sequence[str] = QAT_PARTS, placement: str = "graph",
              interface: str = "symbols") -> List[Site]:
    """Every site of ``parts`` (see the module docstring), with an ablation's extra ones (``qat_scheme``)."""
    double = placement == "double"
    sites: List[Site] = []
    for part_name in parts:
        part = getattr(model, part_name)
        children = list(part.named_children())
        sites.append(Site(part_name + INPUT, stage=part_name == "g_s"))  # g_s's input is y_hat (main path)
        for i, (name, child) in enumerate(children):
            path = f"{part_name}.{name}"
            following = children[i + 1][1] if i + 1 < len(children) else None
            if isinstance(child, _CONVS):
                if part_name == "g_a" and following is None:
                    if interface == "latent":
                        sites.append(Site(path, in_graph=False))
                    continue  # the symbols: the codec's rounding at scale 1
                if not isinstance(following, _FUSED_ACTIVATIONS):
                    sites.append(Site(path, stage=True))
                elif double:
                    sites.append(Site(path, in_graph=False))
            elif isinstance(child, _FUSED_ACTIVATIONS):
                sites.append(Site(path, stage=True))
            else:
                sites.extend(_block_sites(path, child, double))
    return sites


def site_bits(site: Site, precision: str) -> int:
    return 16 if precision == "a16w8" and site.stage else 8


def prepare_qat(model: nn.Module, scheme: Mapping[str, Any]) -> nn.Module:
    """Weight fake-quant on every convolution of ``scheme['parts']`` and one activation quantiser per site, in place.

    Weight and activation quantisers start switched off (the model computes
    in float until ``calibrate``); their scales, zero points and flags are in the state
    dict, so a QAT state dict loads strictly into a model built here.
    """
    scheme = normalise_scheme(scheme)
    for part_name in scheme["parts"]:
        for module in getattr(model, part_name).modules():
            if type(module) in _WEIGHT_AXIS:
                parametrize.register_parametrization(module, "weight", WeightFakeQuant(_WEIGHT_AXIS[type(module)]))
    for site in qat_sites(model, scheme["parts"], scheme["placement"], scheme["interface"]):
        bits = site_bits(site, scheme["precision"])
        learned = scheme["scales"] == "learned" and bits == 8
        fq = (LearnedFakeQuantize if learned else FrozenFakeQuantize)(0, 2 ** bits - 1)
        fq.in_graph = site.in_graph
        if site.name.endswith(INPUT):
            part = getattr(model, site.name[: -len(INPUT)])
            first = part[0]  # a child added to an nn.Sequential would run as a layer
            first.input_fake_quant = fq
            first.register_forward_pre_hook(_quantise_input)
        else:
            module = model.get_submodule(site.name)
            module.output_fake_quant, module.output_fake_quant_factor = fq, site.factor
            module.register_forward_hook(_quantise_output)
    return model


def activation_quantisers(model: nn.Module) -> Dict[str, FakeQuantizeBase]:
    """Site name -> its fake-quant module."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "output_fake_quant", None), FakeQuantizeBase):
            found[name] = module.output_fake_quant
        if isinstance(getattr(module, "input_fake_quant", None), FakeQuantizeBase):
            found[name.rsplit(".", 1)[0] + INPUT] = module.input_fake_quant
    return found


def fake_quant_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (FakeQuantizeBase, WeightFakeQuant))]


def is_qat_model(model: nn.Module) -> bool:
    return bool(fake_quant_modules(model))


def qat_state(model: nn.Module) -> str:
    """'off', 'uncalibrated' or 'training with frozen / learned scales', read from the modules."""
    quantisers = list(activation_quantisers(model).values())
    if not quantisers:
        return "off"
    if not all(bool(q.fake_quant_enabled[0]) for q in quantisers):
        return "uncalibrated"
    learned = any(isinstance(q, LearnedFakeQuantize) for q in quantisers)
    return f"training with {'learned' if learned else 'frozen'} scales"


def float_twin(model: nn.Module) -> nn.Module:
    """A float copy of a QAT model: the same weights, without weight or activation fake-quant."""
    twin = copy.deepcopy(model).cpu()
    for module in twin.modules():
        if parametrize.is_parametrized(module, "weight"):
            # Not remove_parametrizations: the copy shares its parametrized class with the original, which
            # that would strip too. The copy alone goes back to its plain class with its float weight.
            weight = module.parametrizations.weight.original
            module.__class__ = module.__class__.__bases__[0]
            del module._modules["parametrizations"]
            module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        for hooks, fn in ((module._forward_hooks, _quantise_output), (module._forward_pre_hooks, _quantise_input)):
            for key in [k for k, hook in hooks.items() if hook is fn]:
                del hooks[key]
        for attr in ("output_fake_quant", "input_fake_quant"):
            if hasattr(module, attr):
                delattr(module, attr)
    return twin.eval()


def placement(model: nn.Module, qparams: Mapping[str, Any]) -> Dict[str, List[str]]:
    """The sites the fake-quant model rounds against the ones the graph quantises: what only one side has
    (an ablation's extra roundings, which no graph has, left aside)."""
    ours = {name for name, fq in activation_quantisers(model).items() if getattr(fq, "in_graph", True)}
    theirs = set(qparams)
    return {"only_in_model": sorted(ours - theirs), "only_in_graph": sorted(theirs - ours)}


def set_qparams(model: nn.Module, qparams: Mapping[str, Tuple[float, int, int]],
                extra: Optional[Mapping[str, Tuple[float, int, int]]] = None) -> None:
    """Load the graph's scales (and an ablation's ``extra`` ones) into the quantisers and switch fake-quant on;
    every site must get one."""
    missing = placement(model, qparams)
    if missing["only_in_model"] or missing["only_in_graph"]:
        raise ValueError(f"QAT placement differs from the INT8 graph: {missing}")
    qparams = {**(extra or {}), **qparams}
    for name, fq in activation_quantisers(model).items():
        if name not in qparams:
            raise ValueError(f"no scale for the ablation's site {name}")
        scale, zero_point, bits = qparams[name]
        if 2 ** bits - 1 != fq.quant_max:
            raise ValueError(f"site {name}: the graph has {bits} bits, the model {fq.quant_max.bit_length()}")
        fq.set_qparams(scale, zero_point)
        fq.enable_fake_quant()
    for module in model.modules():
        if isinstance(module, WeightFakeQuant):
            module.fake_quant_enabled.fill_(1)


def activation_precision(model: nn.Module) -> str:
    return "a16w8" if any(fq.quant_max > 255 for fq in activation_quantisers(model).values()) else "w8a8"
