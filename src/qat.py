"""Quantisation-aware training (QAT): a short phase after float training, rounding where the INT8 graph rounds.

The NPU runs g_a (image -> symbols) and g_s (symbols -> image); the entropy
model stays in float on the host. QAT is run the way the field runs it: the
float model is trained first, then a short phase at a low learning rate
(``--qat true --base_checkpoint FLOAT.pt``) trains it with the rounding of the
very graph it will be exported to. Three things make that graph and the
trained model the same:

- **Placement = the exported graph.** PTQ (``src.int8``) writes the INT8 pair
  with onnxruntime's ``quantize_static`` on the symbol-interface graphs. Here
  each tensor that graph quantises is one *site* of the PyTorch model
  (``qat_sites``): one quantiser after each fused Conv + activation
  (onnxruntime removes the ReLU6 / Clip and quantises once, on the
  activation's range), after pooling, on the NPU blocks' products, gains and
  residual sums (``QuantPoint``), on each ECA gate (``2 * HardSigmoid`` is
  ``Clip(conv')`` in the graph: the site quantises 2x the HardSigmoid), on
  the decoder's input ``y_hat = symbols + medians`` and on ``x_hat``. Nothing
  quantises g_a's output: in the graph that quantiser is the codec's own
  rounding at scale 1 (``SymbolEncoder``), which the entropy bottleneck already
  models in training (noise) and in eval (rounding). ``graph_site`` maps each
  of the ORT graph's quantised tensors to its site; ``placement`` checks
  that the two sets are the same.
- **Scales from PTQ's calibration.** ``calibrate`` runs PTQ itself on the
  float weights (whole calibration photos, ``src.int8.choose_range``, the
  precision profile) and reads every activation's scale and zero point off the
  written QDQ graph: at step 0 the QAT model *is* the PTQ codec. Weights are
  INT8 per output channel, symmetric on [-127, 127] with the scale of their
  current absolute maximum: the rule ``quantize_static`` applies to the
  exported weights, so the weight grid needs no calibration.
- **Export through the same pipeline.** ``export_pair`` writes the float
  weights' symbol graphs and quantises them with ``quantize_static``, passing
  every activation's QAT scale and zero point as ``TensorQuantOverrides``: the
  shipped graph is the PTQ graph with QAT's weights and scales.

Scales (``--qat_scales``): ``learned`` (the default, docs/int8_study.md)
trains the 8-bit ones with LSQ (torch's learnable fake-quant op) from the
calibrated start, in log space (``LearnedFakeQuantize``: every scale moves by
the same fraction per step, whatever its size); ``frozen`` keeps the
calibrated scales (buffers).
16-bit tensors (``a16w8``) keep their calibrated scales in both modes: their
rounding is ~0.4 % of an 8-bit step, too fine for its scale to be worth learning.

Phases: the model is built with fake-quant off ("uncalibrated"); ``calibrate``
sets the scales and switches it on ("training with frozen / learned
scales"). The flags and scales are in the state dict and the scheme in the
checkpoint's architecture, so a resumed run continues in the same phase with
the same scales (it never recalibrates).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType
from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
from torch import nn
from torch.ao.quantization import FakeQuantizeBase
from torch.nn.utils import parametrize

from src.cli import UserError
from src.data import image_files
from src.images import image_tensor, load_rgb
from src.int8 import (calibrate as int8_calibrate, choose_range, float_islands, latent_medians, pad_to, prepared,
                      quantise, quantise_pair, run, session, symbol_bits, symbol_graphs, symbol_override)
from src.npu_blocks import ECAGate, GDNishLiteDec, GDNishLiteEnc

QAT_PARTS = ("g_a", "g_s")
SCALE_MODES = ("frozen", "learned")
PLACEMENTS, INTERFACES = ("graph", "double"), ("symbols", "latent")
PRECISIONS = ("w8a8", "a16w8")  # src.int8.PROFILES
DEFAULT_PRECISION, DEFAULT_SCALES = "w8a8", "learned"  # learned: measured better (docs/int8_study.md)
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # onnxruntime's symmetric INT8 weight range
LOG_SCALE_GAIN = 30.0  # learned scales: relative step per optimizer step ~ LOG_SCALE_GAIN * lr (LearnedFakeQuantize)
_FUSED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)
_WEIGHT_AXIS = {nn.Conv1d: 0, nn.Conv2d: 0, nn.ConvTranspose2d: 1}
INPUT = ":in"


def qat_scheme(precision: str = DEFAULT_PRECISION, scales: str = DEFAULT_SCALES, placement: str = "graph",
               interface: str = "symbols") -> Dict[str, Any]:
    """The QAT part of an architecture description (what ``prepare_qat`` builds).

    ``placement`` and ``interface`` exist for the study's ablation of the
    QAT this project had before: ``double`` also rounds each convolution's
    output before its ReLU6 (the graph rounds once, after it), ``latent``
    also puts g_a's output on an 8-bit grid (the graph hands over the
    symbols at scale 1). Neither is what the exported graph computes.
    """
    if placement not in PLACEMENTS or interface not in INTERFACES:
        raise ValueError(f"QAT placement/interface must be in {PLACEMENTS}/{INTERFACES}, got {placement}/{interface}")
    if precision not in PRECISIONS:
        raise ValueError(f"QAT precision must be one of {PRECISIONS}, got {precision!r}")
    if scales not in SCALE_MODES:
        raise ValueError(f"QAT scales must be one of {SCALE_MODES}, got {scales!r}")
    return {"parts": list(QAT_PARTS), "weights": "int8 per-channel symmetric [-127, 127] (absmax, as onnxruntime)",
            "activations": "the exported graph's quantised tensors (src.int8 symbol interface)",
            "precision": precision, "scales": scales, "placement": placement, "interface": interface,
            "learned_scales": f"log space, relative step ~{LOG_SCALE_GAIN:g} x lr"}


def normalise_scheme(qat: Any) -> Optional[Dict[str, Any]]:
    """None, or the full scheme for True / a stored scheme; ValueError for anything else (e.g. an old scheme)."""
    if not qat:
        return None
    if qat is True:
        return qat_scheme()
    if not isinstance(qat, Mapping) or "precision" not in qat or "scales" not in qat:
        raise ValueError(f"qat must be None or a scheme of src.qat.qat_scheme(), got {qat!r} (a QAT checkpoint "
                         "of the old observer scheme: run the QAT phase again from its float checkpoint)")
    scheme = qat_scheme(qat["precision"], qat["scales"], qat.get("placement", "graph"), qat.get("interface", "symbols"))
    # A scheme from before log-space scales: its scales load converted (LearnedFakeQuantize); only a resume
    # refuses it (is_absolute_step_scheme), as its optimizer state belongs to the scales themselves.
    stored = {"learned_scales": scheme["learned_scales"], **qat}
    if stored != scheme:
        raise ValueError(f"qat must be None or {scheme}, got {dict(qat)!r}")
    return scheme


def is_absolute_step_scheme(qat: Any) -> bool:
    """A stored QAT scheme whose learned scales were parameters themselves (before ``LearnedFakeQuantize``'s log
    space). Not a frozen-scale one: its scales were buffers then as now, so its resume is exact."""
    return (isinstance(qat, Mapping) and "precision" in qat and "learned_scales" not in qat
            and qat.get("scales") == "learned")


def qat_arch(args: Any) -> Optional[Dict[str, Any]]:
    """The scheme the flags ask for (None without ``--qat``)."""
    return qat_scheme(args.qat_precision, args.qat_scales, args.qat_placement, args.qat_interface) if args.qat else None


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
    ``stage``: on the main path (16 bits in ``a16w8``, as ``src.int8.stage_outputs``).
    """
    name: str
    factor: float = 1.0
    stage: bool = False
    in_graph: bool = True  # False: an ablation's extra rounding, which the exported graph does not have


def _block_sites(path: str, block: nn.Module, double: bool) -> List[Site]:
    extra = []
    if isinstance(block, GDNishLiteEnc):
        extra = [Site(f"{path}.expand", in_graph=False), Site(f"{path}.dw", in_graph=False)] if double else []
        if not isinstance(block.bn1, nn.Identity) or not isinstance(block.bn2, nn.Identity):
            raise ValueError(f"{path}: QAT does not support BatchNorm in the NPU blocks")
        sites = [Site(f"{path}.act1"), Site(f"{path}.act2"), Site(f"{path}.project")]
        if isinstance(block.eca, ECAGate):
            sites += [Site(f"{path}.eca.pool"), Site(f"{path}.eca.gate", 2.0), Site(f"{path}.eca.gated")]
        sites.append(Site(f"{path}.summed") if block.residual else None)
    elif isinstance(block, GDNishLiteDec):
        if not isinstance(block.bn, nn.Identity):
            raise ValueError(f"{path}: QAT does not support BatchNorm in the NPU blocks")
        extra = [Site(f"{path}.mix", in_graph=False)] if double else []
        sites = [Site(f"{path}.act"), Site(f"{path}.gain_out"), Site(f"{path}.gained"), Site(f"{path}.dw")]
        sites.append(Site(f"{path}.summed") if block.residual else None)
    else:
        raise ValueError(f"{path}: QAT quantises convolutions, ReLU/ReLU6 and the NPU blocks, not "
                         f"{type(block).__name__} (swap every GDN first)")
    sites = [s for s in sites if s is not None]
    return extra + sites[:-1] + [Site(sites[-1].name, sites[-1].factor, stage=True)]  # the block's output


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


def upgrade_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with the learned scales of the earlier scheme (torch.ao's ``_LearnableFakeQuantize``: the scale
    itself and an idle observer) as ``model``'s log-space ones, so the checkpoints it wrote still load for
    evaluation and export (their resume is refused: ``is_absolute_step_scheme``). Anything else is untouched."""
    state = dict(state)
    for path, module in model.named_modules():
        if not isinstance(module, LearnedFakeQuantize):
            continue
        owner = path + "."
        if owner + "scale" in state and owner + "log_scale" not in state:
            state[owner + "log_scale"] = torch.log(state.pop(owner + "scale").float().reshape(1)) / LOG_SCALE_GAIN
            obsolete = ("static_enabled", "learning_enabled", "eps", "activation_post_process")
            for key in [k for k in state if k.startswith(owner) and k[len(owner):].split(".")[0] in obsolete]:
                del state[key]
    return state


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


# ---------------------------------------------------------------- the ORT graph's quantised tensors -> sites

def _producers(graph: onnx.GraphProto) -> Dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def graph_site(model: nn.Module, tensor: str, graph: onnx.GraphProto) -> Optional[str]:
    """The site of a tensor of a prepared FP32 symbol graph (``src.int8``), or None for the symbols.

    The TorchScript exporter names each node by the module path it ran in
    (``/g_a/g_a.1/eca/gate/Clip``); the graph form of the blocks
    (``src.int8.gates_as_clips``) differs from the training form only in the
    folded gates, and an op inside a block (Mul, Add) writes the tensor its
    ``QuantPoint`` marks. Reshapes carry their input's values (and scale).
    """
    tensor = tensor.removesuffix("_QuantizeLinear_Input")  # how quantize_static renames a quantised graph output
    node = _producers(graph).get(tensor)
    if node is None:
        if tensor not in {i.name for i in graph.input}:
            raise ValueError(f"{tensor} is neither a graph input nor written by a node of the FP32 graph")
        return None if tensor == "symbols" else "g_a" + INPUT  # the image, or the decoder's symbols
    if node.op_type == "Reshape":
        return graph_site(model, node.input[0], graph)
    scope, op = node.name.strip("/").split("/")[:-1], node.op_type
    if not scope:
        if op == "Add":
            return "g_s" + INPUT  # symbols + medians = y_hat
        raise ValueError(f"no QAT site for {tensor} ({op} outside g_a/g_s)")
    path = ".".join([scope[1] if len(scope) > 1 else scope[0]] + scope[2:])
    consumers = [n for n in graph.node if tensor in n.input]
    if node.op_type in ("Conv", "ConvTranspose") and len(consumers) == 1 and consumers[0].op_type in ("Clip", "Relu"):
        return "fused:" + path  # onnxruntime drops the activation and quantises once, on its output
    module = model.get_submodule(path)
    if isinstance(module, ECAGate) and op == "Mul":
        return f"{path}.gated"
    if isinstance(module, GDNishLiteEnc) and op == "Add":
        return f"{path}.summed"
    if isinstance(module, GDNishLiteDec) and op in ("Mul", "Add"):
        return f"{path}.{'gained' if op == 'Mul' else 'summed'}"
    if isinstance(module, nn.Conv2d) and op == "Clip" and path.endswith(".scale"):
        return path[: -len(".scale")] + ".gain_out"  # GDNishLiteDec's gate folded into its scale conv
    if path == "g_a." + str(len(model.g_a) - 1):
        return None  # the symbols
    return path


def graph_qparams(model: nn.Module, qdq_path: Path, fp32_path: Path) -> Dict[str, Tuple[float, int, int]]:
    """Site -> (scale, zero point, bits) of every activation the QDQ graph quantises (symbols excluded)."""
    qdq = onnx.load(str(qdq_path)).graph
    fp32 = onnx.load(str(fp32_path)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in qdq.initializer}
    found: Dict[str, Tuple[float, int, int]] = {}
    for node in qdq.node:
        if node.op_type != "QuantizeLinear":
            continue
        site = graph_site(model, node.input[0], fp32)
        if site is None:
            continue
        zero_point = consts[node.input[2]]
        entry = (float(consts[node.input[1]]), int(zero_point), 8 * zero_point.dtype.itemsize)
        if site in found and found[site] != entry:
            raise ValueError(f"{node.input[0]} and another tensor of site {site} have different scales")
        found[site] = entry
    return found


def placement(model: nn.Module, qparams: Mapping[str, Any]) -> Dict[str, List[str]]:
    """The sites the fake-quant model rounds against the ones the graph quantises: what only one side has
    (an ablation's extra roundings, which no graph has, left aside)."""
    ours = {name for name, fq in activation_quantisers(model).items() if getattr(fq, "in_graph", True)}
    theirs = set(qparams)
    return {"only_in_model": sorted(ours - theirs), "only_in_graph": sorted(theirs - ours)}


def graph_tensors(fp32_path: Path) -> List[str]:
    """The tensors ``quantize_static`` quantises in a prepared FP32 graph (its calibrator's list)."""
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(fp32_path), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Percentile)  # as src.int8
        return sorted(calibrator.tensors_to_calibrate)


# ---------------------------------------------------------------- calibration and export

@dataclass
class QatPair:
    """The INT8 pair of a QAT model, its FP32 twin's symbol graphs, and how it was written."""
    encoder: Path
    decoder: Path
    fp32: Dict[str, Path]
    precision: str
    symbol_bits: int
    symbols_outside_int8: int
    float_islands: Dict[str, List[str]]


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


def calibrate(model: nn.Module, images: Sequence[np.ndarray], range_method: str, folder: Path) -> Dict[str, Any]:
    """PTQ of the model's float weights (``src.int8``) on whole ``images``; its scales become the QAT scales.

    ``images``: (1, 3, H, W) float arrays, padded to 64. Returns what the log
    and the report say about it (sites, 16-bit tensors, symbols).
    """
    precision = activation_precision(model)
    twin = float_twin(model)
    fp32 = symbol_graphs(twin, torch.from_numpy(images[0]), folder)
    calib = int8_calibrate(fp32, images, folder)
    pair = quantise_pair(calib, precision, range_method, folder / "int8")
    qparams = {**graph_qparams(model, pair.encoder, calib.sources["encoder"]),
               **graph_qparams(model, pair.decoder, calib.sources["decoder"])}
    set_qparams(model, qparams, ablation_qparams(model, calib, range_method))
    return {"sites": len(qparams), "sixteen_bit": sum(b == 16 for _, _, b in qparams.values()),
            "symbol_bits": pair.symbol_bits, "symbols_outside_int8": pair.symbols_outside_int8,
            "images": len(images), "range_method": range_method, "precision": precision}


def ablation_qparams(model: nn.Module, calib: Any, range_method: str) -> Dict[str, Tuple[float, int, int]]:
    """Scales of an ablation's extra sites, from the same histograms and range method (8 bits, onnxruntime's
    scale / zero point rule): the pre-activation convolutions (``double``) and y itself (``latent``: the
    histogram of y - median, widened by the medians' extremes)."""
    wanted = {n for n, fq in activation_quantisers(model).items() if not getattr(fq, "in_graph", True)}
    found = {}
    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.UINT8)
    for half, hists in (("encoder", calib.encoder), ("decoder", calib.decoder)):
        graph = onnx.load(str(calib.sources[half])).graph
        for tensor, hist in hists.items():
            site = graph_site(model, tensor, graph)
            name = site[len("fused:"):] if site and site.startswith("fused:") else (
                f"g_a.{len(model.g_a) - 1}" if site is None and half == "encoder" and tensor == "symbols" else None)
            if name not in wanted:
                continue
            low, high = choose_range(hist, 8, range_method)
            if site is None:
                medians = latent_medians(model)
                low, high = low + float(medians.min()), high + float(medians.max())
            zero_point, scale = compute_scale_zp(np.float32(low), np.float32(high), qmin, qmax)
            found[name] = (float(scale), int(zero_point), 8)
    return found


def activation_precision(model: nn.Module) -> str:
    return "a16w8" if any(fq.quant_max > 255 for fq in activation_quantisers(model).values()) else "w8a8"


class ScaleOverrides:
    """``TensorQuantOverrides`` for ``src.int8.quantise``: each tensor's scale and zero point, as given."""

    def __init__(self, table: Dict[str, List[Dict]]):
        self.table = table

    def overrides(self) -> Dict[str, List[Dict]]:
        return self.table


def overrides_for(model: nn.Module, fp32_path: Path, symbol_bits: int) -> ScaleOverrides:
    """The QAT model's scales for every tensor the prepared graph at ``fp32_path`` quantises."""
    graph = onnx.load(str(fp32_path)).graph
    quantisers = activation_quantisers(model)
    table = {}
    for tensor in graph_tensors(fp32_path):
        site = graph_site(model, tensor, graph)
        if site is None:  # the symbols: integers at scale 1 (the codec's rounding)
            table[tensor] = symbol_override(symbol_bits)
        elif site in quantisers:
            scale, zero_point = quantisers[site].calculate_qparams()
            sixteen = quantisers[site].quant_max > 255
            table[tensor] = [{"quant_type": QuantType.QUInt16 if sixteen else QuantType.QUInt8,
                              "scale": np.array(float(scale), np.float32),
                              "zero_point": np.array(int(zero_point), np.uint16 if sixteen else np.uint8)}]
        elif not site.startswith("fused:"):
            raise ValueError(f"the INT8 graph quantises {tensor} (site {site}), the QAT model does not")
    return ScaleOverrides(table)


@torch.no_grad()
def export_pair(model: nn.Module, images: Sequence[np.ndarray], folder: Path, opset: int = 13) -> QatPair:
    """The INT8 symbol pair of a QAT model: its float weights' graphs, quantised with its own scales.

    ``images`` (whole, padded to 64) give the example input and the symbol
    bit-width check (int16 symbols where any falls outside int8).
    """
    if qat_state(model) == "uncalibrated":
        raise UserError("this QAT checkpoint was never calibrated (no scales to export): train it with --qat true "
                        "from a float checkpoint first")
    twin = float_twin(model)
    fp32 = symbol_graphs(twin, torch.from_numpy(images[0]), folder, opset)
    encoder = session(fp32["encoder"])
    symbols = [run(encoder, image) for image in images]
    bits, outside = symbol_bits(symbols)
    paths = {}
    for half, source, example in (("encoder", fp32["encoder_centred"], images[0]),
                                  ("decoder", fp32["decoder"], symbols[0])):
        src = prepared(source, folder)
        paths[half] = quantise(src, folder / f"{half}.int8.onnx", overrides_for(model, src, bits), example)
    return QatPair(paths["encoder"], paths["decoder"], fp32, activation_precision(model), bits, outside,
                   {half: float_islands(path) for half, path in paths.items()})


def start_phase(model: nn.Module, calib_dir: Path, count: int, range_method: str, say=print) -> Dict[str, Any]:
    """The engine's one QAT hook (fresh runs): calibrate on whole photos, then train with those scales.

    The first ``count`` photos of ``calib_dir`` by name (the same set on every rank and every rerun).
    """
    files = image_files(calib_dir, "--qat_calib_dir")[:count]
    say(f"QAT phase 1/2: calibrating {len(activation_quantisers(model))} activation quantisers on {len(files)} "
        f"whole photos of {calib_dir} (PTQ of the float weights, {range_method} ranges)")
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as tmp:
        info = calibrate(model, calibration_images(files), range_method, Path(tmp))
    model.to(device)
    say(f"QAT phase 2/2: {info['sites']} quantisers = the INT8 graph's quantised tensors ({info['sixteen_bit']} at "
        f"16 bits, {info['precision']}), symbols int{info['symbol_bits']}; now {qat_state(model)}")
    return info


def calibration_images(files: Iterable[Path]) -> List[np.ndarray]:
    """Whole photos as (1, 3, H, W) float arrays zero-padded to 64, as PTQ calibrates."""
    return [pad_to(image_tensor(load_rgb(f)).numpy(), 64) for f in files]
