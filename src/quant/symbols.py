"""The symbol interface as PyTorch modules and FP32 ONNX graphs: what PTQ, QAT export and the codec bundle quantise.

The entropy coder codes ``round(y - median)``. ``SymbolEncoder`` ends at
exactly that tensor (``-median`` folded into the last convolution's bias),
``SymbolDecoder`` takes the symbols and adds the medians itself (see
``src.quant.ptq`` for why). Before export the NPU blocks' HardSigmoid gates
are rewritten into the convolution before them (``gates_as_clips``, each block's ``export_form``):
``a + b * HardSigmoid(conv(x))`` is ``Clip(conv'(x), a, a + b)`` with conv'
scaled, exactly in real arithmetic. Conv + Clip is one quantised node in
every QDQ toolchain, whereas onnxruntime leaves HardSigmoid in float.

Torch only (``torch.onnx`` writes the graphs; nothing here loads onnx or onnxruntime).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn

ENCODER_OUTPUT, DECODER_INPUT = "symbols", "symbols"


# ---------------------------------------------------------------- graphs in the form integer NPUs quantise

def gates_as_clips(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose NPU-block gates are Conv + Clip: each block's own ``export_form()`` (same function;
    see the module docstring)."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        if name and hasattr(child, "export_form"):
            parent, attr = _parent(module, name)
            setattr(parent, attr, child.export_form())
    return module.export_form() if hasattr(module, "export_form") else module


def _parent(root: nn.Module, name: str) -> Tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


class SymbolEncoder(nn.Module):
    """g_a with ``-median`` folded into its last convolution's bias: image -> ``y - median`` [-> rounded].

    Folded, not subtracted: a Sub after the convolution would be one more
    quantised tensor, requantised onto a grid that does not hold the symbols.
    ``rounded=True`` ends with ``Round`` (the FP32 codec's encoder graph);
    without it the INT8 graph's output quantiser at scale 1 rounds.
    """

    def __init__(self, model: nn.Module, rounded: bool):
        super().__init__()
        self.g_a, self.rounded = gates_as_clips(model.g_a), rounded
        last = self.g_a[-1]
        if not isinstance(last, nn.Conv2d) or last.bias is None:
            raise ValueError("g_a must end with a convolution with a bias to fold the medians into")
        with torch.no_grad():
            last.bias.sub_(latent_medians(model).reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = self.g_a(x)
        return torch.round(centred) if self.rounded else centred


class SymbolDecoder(nn.Module):
    """Symbols -> image: ``g_s(symbols + median)``, the medians added inside the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.g_s = gates_as_clips(model.g_s)
        self.register_buffer("medians", latent_medians(model).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, symbols: torch.Tensor) -> torch.Tensor:
        return self.g_s(symbols + self.medians)


def latent_medians(model: nn.Module) -> torch.Tensor:
    """Per-channel medians of the entropy bottleneck, (M,)."""
    with torch.no_grad():
        return model.entropy_bottleneck._get_medians().reshape(-1).detach().float().cpu()


def export_module(module: nn.Module, example: torch.Tensor, out: Path, input_name: str, output_name: str,
                  opset: int) -> Path:
    """A dynamic-H/W ONNX graph of ``module`` (TorchScript exporter, as ``src.quant.onnx_export``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module.eval(), (example,), str(out), input_names=[input_name], output_names=[output_name],
                          opset_version=opset, dynamic_axes={input_name: {2: "h", 3: "w"}, output_name: {2: "h", 3: "w"}},
                          dynamo=False)
    return out


@torch.no_grad()
def symbol_graphs(model: nn.Module, example: torch.Tensor, folder: Path, opset: int = 13) -> Dict[str, Path]:
    """FP32 graphs of the symbol interface: ``encoder`` (rounded), ``encoder_centred`` (for PTQ), ``decoder``."""
    model = model.eval()
    symbols = SymbolEncoder(model, rounded=True)(example)
    return {"encoder": export_module(SymbolEncoder(model, True), example, folder / "encoder.onnx", "x",
                                     ENCODER_OUTPUT, opset),
            "encoder_centred": export_module(SymbolEncoder(model, False), example, folder / "encoder_centred.onnx",
                                             "x", ENCODER_OUTPUT, opset),
            "decoder": export_module(SymbolDecoder(model), symbols, folder / "decoder.onnx", DECODER_INPUT, "x_hat",
                                     opset)}
