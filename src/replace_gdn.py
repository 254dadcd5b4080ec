"""Model surgery: swap GDN/IGDN for other activations, and choose what trains.

GDN layers are found by type (``compressai.layers.GDN``; IGDN is the same class
with ``inverse=True``), never by position, so this works on every CompressAI
model with ``g_a``/``g_s`` transforms (factorized, hyperprior, mean-scale, ...).

Note: CompressAI's zoo entry ``bmshj2018_factorized_relu`` (1.2.8) builds the
GDN ``FactorizedPrior`` architecture, so it silently keeps GDN. The recipe
therefore loads the ordinary model and swaps the layers here.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from compressai.layers import GDN
from torch import nn

from src.npu_blocks import GDNishLiteDec, GDNishLiteEnc

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


# ---------------------------------------------------------------- GDN -> NPU blocks
# Swap GDN for ``GDNishLiteEnc`` and IGDN for ``GDNishLiteDec`` (NPU-friendly blocks).

def gdn_channels(gdn: GDN) -> int:
    """GDN stores one beta per channel."""
    return int(gdn.beta.numel())


def replace_gdn_with_npu(model: nn.Module, mode: str = "all", enc_kwargs: Optional[Dict[str, Any]] = None,
                         dec_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """GDN -> GDNishLiteEnc, IGDN -> GDNishLiteDec, channels read from each replaced layer.

    Whether a layer is GDN or IGDN is read from ``gdn.inverse``, not from the
    transform it sits in.
    """
    enc_kwargs, dec_kwargs = dict(enc_kwargs or {}), dict(dec_kwargs or {})

    def make_block(gdn: GDN) -> nn.Module:
        if gdn.inverse:
            return GDNishLiteDec(gdn_channels(gdn), **dec_kwargs)
        return GDNishLiteEnc(gdn_channels(gdn), **enc_kwargs)

    return replace_gdn(model, mode, make_block)


# ---------------------------------------------------------------- fitting the new blocks to GDN (--init_from_gdn)
# A better start than identity: fit each new block to the GDN/IGDN it replaces.
#
# ``--init_from_gdn true`` runs the GDN model on real training crops, records
# the input and output of every GDN/IGDN layer, and trains each replacement
# block alone to map the same inputs to the same outputs (block-wise MSE
# regression, Adam). End-to-end fine-tuning then starts from blocks that already
# imitate GDN instead of from the identity.

@torch.no_grad()
def record_gdn_io(gdn_model: nn.Module, paths: Sequence[str], images: torch.Tensor,
                  chunk: int = 4) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, outputs) of each GDN layer at ``paths`` over ``images`` (eval mode)."""
    records: Dict[str, List[List[torch.Tensor]]] = {p: [[], []] for p in paths}

    def hook(path):
        def save(module, inputs, output):
            records[path][0].append(inputs[0].detach().float())
            records[path][1].append(output.detach().float())
        return save

    handles = [gdn_model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    gdn_model.eval()
    try:
        for start in range(0, len(images), chunk):
            gdn_model(images[start:start + chunk])
    finally:
        for handle in handles:
            handle.remove()
    return {p: (torch.cat(xs), torch.cat(ys)) for p, (xs, ys) in records.items()}


def fit_block(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int, lr: float,
              batch: int = 4) -> Tuple[float, float]:
    """Regress ``block(inputs)`` onto ``targets``; returns the relative MSE before and after.

    The block keeps its starting weights if the fit did not improve on them.
    """
    params = [p for p in block.parameters()]
    if not params:
        return float("nan"), float("nan")

    def relative_mse() -> float:
        with torch.no_grad():
            return (F.mse_loss(block(inputs), targets) / targets.pow(2).mean().clamp_min(1e-12)).item()

    before = relative_mse()
    start = {k: v.clone() for k, v in block.state_dict().items()}
    was_training = block.training
    block.train()
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        pick = torch.randint(0, len(inputs), (min(batch, len(inputs)),))
        loss = F.mse_loss(block(inputs[pick]), targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    block.train(was_training)
    after = relative_mse()
    if not after < before:  # never hand back a block that imitates GDN worse than its start
        block.load_state_dict(start)
        after = before
    return before, after


def fit_blocks_to_gdn(gdn_model: nn.Module, model: nn.Module, images: torch.Tensor, steps: int = 300,
                      lr: float = 1e-3, say: Callable[[str], None] = print) -> Dict[str, Tuple[float, float]]:
    """Fit every replaced block of ``model`` to its GDN counterpart in ``gdn_model``."""
    paths = list(getattr(model, "replaced_gdn", ()))
    records = record_gdn_io(gdn_model, paths, images)
    report = {}
    for path in paths:
        inputs, targets = records[path]
        report[path] = fit_block(model.get_submodule(path), inputs, targets, steps, lr)
        say(f"init_from_gdn: {path}: relative MSE to GDN {report[path][0]:.4f} -> {report[path][1]:.4f}")
    return report
