"""A better start than identity: fit each new block to the GDN/IGDN it replaces.

``--init_from_gdn true`` runs the GDN model on real training crops, records
the input and output of every GDN/IGDN layer, and trains each replacement
block alone to map the same inputs to the same outputs (block-wise MSE
regression, Adam). End-to-end fine-tuning then starts from blocks that already
imitate GDN instead of from the identity.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


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
