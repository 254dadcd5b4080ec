"""Model surgery: find GDN/IGDN, swap it (ReLU here; the NPU blocks in ``src.replace_gdn_npu``), choose what trains.

GDN layers are found by type (``compressai.layers.GDN``; IGDN is the same class
with ``inverse=True``), never by position, so this works on every CompressAI
model with ``g_a``/``g_s`` transforms (factorized, hyperprior, mean-scale, ...).

Note: CompressAI's zoo entry ``bmshj2018_factorized_relu`` (1.2.8) builds the
GDN ``FactorizedPrior`` architecture, so it silently keeps GDN. The recipe
therefore loads the ordinary model and swaps the layers here.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from compressai.layers import GDN
from torch import nn

REPLACE_MODES: Dict[str, Tuple[str, ...]] = {
    "encoder": ("g_a",),
    "decoder": ("g_s",),
    "all": ("g_a", "g_s"),
    "none": (),
}
TRAIN_SCOPES = ("replaced", "replaced+hyper", "all")
HYPER_MODULES = ("h_a", "h_s", "entropy_bottleneck", "gaussian_conditional")


def transforms_for(mode: str) -> Tuple[str, ...]:
    if mode not in REPLACE_MODES:
        raise ValueError(f"replace mode must be one of {sorted(REPLACE_MODES)}, got {mode!r}")
    return REPLACE_MODES[mode]


def find_gdn_layers(model: nn.Module, transforms: Sequence[str] = ("g_a", "g_s")) -> List[Tuple[str, GDN]]:
    """(qualified name, layer) of every GDN/IGDN inside the named transforms."""
    found = []
    for transform in transforms:
        sub = getattr(model, transform, None)
        if sub is None:
            raise ValueError(f"{type(model).__name__} has no '{transform}' transform")
        found += [(f"{transform}.{name}", m) for name, m in sub.named_modules() if isinstance(m, GDN)]
    return found


def replace_gdn(model: nn.Module, mode: str, make_block: Callable[[GDN], nn.Module]) -> nn.Module:
    """Replace every GDN/IGDN in the transforms selected by ``mode`` with ``make_block(gdn)``.

    The replaced paths are kept on the model as ``model.replaced_gdn`` (a tuple).
    """
    replaced = []
    for name, gdn in find_gdn_layers(model, transforms_for(mode)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make_block(gdn))
        replaced.append(name)
    model.replaced_gdn = tuple(getattr(model, "replaced_gdn", ())) + tuple(replaced)
    return model


def replace_gdn_with_relu(model: nn.Module, mode: str) -> nn.Module:
    """GDN and IGDN in the chosen transform(s) become ``nn.ReLU``; ``none`` keeps GDN (the control)."""
    return replace_gdn(model, mode, lambda gdn: nn.ReLU(inplace=False))


def replaced_transforms(model: nn.Module) -> Tuple[str, ...]:
    """The transforms (g_a, g_s) in which ``replace_gdn`` swapped something."""
    swapped = {path.split(".")[0] for path in getattr(model, "replaced_gdn", ())}
    return tuple(t for t in ("g_a", "g_s") if t in swapped)


def set_trainable_parts(model: nn.Module, scope: str, mode: Optional[str] = None) -> List[nn.Parameter]:
    """Freeze everything outside ``scope`` and return the trainable parameters.

    ``replaced``: the transform(s) whose activations were swapped (g_a for
    encoder, g_s for decoder, both for all), given by ``mode`` or, without it,
    read from ``model.replaced_gdn``. ``replaced+hyper``: plus h_a/h_s and the
    entropy models. ``all``: everything. With ``mode='none'`` (the GDN
    control) nothing was replaced, so only ``all`` trains anything.
    """
    if scope not in TRAIN_SCOPES:
        raise ValueError(f"train scope must be one of {TRAIN_SCOPES}, got {scope!r}")
    if scope == "all":
        prefixes: Tuple[str, ...] = ("",)
    else:
        transforms = replaced_transforms(model) if mode is None else transforms_for(mode)
        prefixes = tuple(f"{t}." for t in transforms)
        if scope == "replaced+hyper":
            prefixes += tuple(f"{m}." for m in HYPER_MODULES if hasattr(model, m))
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            trainable.append(param)
    if not trainable:
        raise ValueError(f"train scope '{scope}' with replace_parts '{mode or 'none'}' leaves nothing to train; "
                         "use --train_scope all (e.g. for the GDN control)")
    return trainable


def parameter_table(model: nn.Module) -> str:
    """Per top-level module: trainable and frozen parameter counts, as a printable table."""
    rows = []
    for name, child in model.named_children():
        params = list(child.parameters())
        if not params:
            continue
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        rows.append((name, trainable, frozen))
    lines = [f"{'module':<24}{'trainable':>12}{'frozen':>12}"]
    lines += [f"{n:<24}{t:>12,}{f:>12,}" for n, t, f in rows]
    lines.append(f"{'total':<24}{sum(r[1] for r in rows):>12,}{sum(r[2] for r in rows):>12,}")
    return "\n".join(lines)


def freeze_rate_only_parameters(model: nn.Module) -> int:
    """Freeze what only feeds the rate (all but g_a/g_s and the quantiles); returns how many were trainable.

    Without a rate term nothing in the loss depends on the entropy models'
    densities, nor on a hyperprior's h_a/h_s (in training, y_hat is y plus
    noise, whatever the predicted scales and means), and DDP refuses
    parameters that never receive a gradient. The quantiles still follow the aux loss.
    """
    count = 0
    for name, param in model.named_parameters():
        if not name.startswith(("g_a.", "g_s.")) and not name.endswith(".quantiles"):
            count += param.numel() if param.requires_grad else 0
            param.requires_grad_(False)
    return count


def split_aux_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(net, aux) trainable parameters: aux are the entropy bottlenecks' ``.quantiles``."""
    net, aux = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (aux if name.endswith(".quantiles") else net).append(param)
    return net, aux
