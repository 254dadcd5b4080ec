"""GDN/IGDN -> NPU-friendly blocks (the recipe's ``src/replace_gdn_npu.py``), and fitting them to GDN.

GDN becomes ``GDNishLiteEnc`` and IGDN ``GDNishLiteDec`` (``src.npu_blocks``):
no division and no square root, so the network quantises to INT8. The layers
are found by type, as ``src.replace_gdn`` finds them for the ReLU swap, so

    from src.replace_gdn_npu import replace_gdn_with_npu
    model = replace_gdn_with_npu(model, mode=args.replace_parts)

works on every CompressAI model with ``g_a``/``g_s`` transforms, right after
the model is built (the recipe's snippet C; see ``src/train_finetune_relu.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from compressai.layers import GDN
from torch import nn

from src.npu_blocks import GDNishLiteDec, GDNishLiteEnc
from src.replace_gdn import find_gdn_layers, replace_gdn, transforms_for


def gdn_channels(gdn: GDN) -> int:
    """GDN stores one beta per channel."""
    return int(gdn.beta.numel())


def replace_gdn_with_npu(model: nn.Module, mode: str = "all", enc_kwargs: Optional[Dict[str, Any]] = None,
                         dec_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """GDN -> GDNishLiteEnc, IGDN -> GDNishLiteDec, channels read from each replaced layer.

    Whether a layer is GDN or IGDN is read from ``gdn.inverse``, not from the
    transform it sits in. The options each block was made with are kept on the
    model as ``model.npu_block_kwargs`` (``{path: kwargs}``), beside
    ``model.replaced_gdn``: a model changed by hand is described from them
    (``src.model_factory.describe_model``). A ``mode`` whose transforms hold
    no GDN any more (already swapped, e.g. for ReLU) is an error, not a silent no-op.
    """
    enc_kwargs, dec_kwargs = dict(enc_kwargs or {}), dict(dec_kwargs or {})
    transforms = transforms_for(mode)
    if transforms and not find_gdn_layers(model, transforms):
        done = [p for p in getattr(model, "replaced_gdn", ()) if p.split(".")[0] in transforms]
        raise ValueError(f"replace_gdn_with_npu(mode={mode!r}): {' and '.join(transforms)} "
                         f"hold{'s' if len(transforms) == 1 else ''} no GDN/IGDN to replace"
                         + (f" ({', '.join(done)} were replaced already)" if done else "")
                         + "; call it on the GDN model, right after the model is built")

    def make_block(gdn: GDN) -> nn.Module:
        if gdn.inverse:
            return GDNishLiteDec(gdn_channels(gdn), **dec_kwargs)
        return GDNishLiteEnc(gdn_channels(gdn), **enc_kwargs)

    already = len(getattr(model, "replaced_gdn", ()))
    replace_gdn(model, mode, make_block)
    made = {path: dict(dec_kwargs if isinstance(model.get_submodule(path), GDNishLiteDec) else enc_kwargs)
            for path in model.replaced_gdn[already:]}
    model.npu_block_kwargs = {**getattr(model, "npu_block_kwargs", {}), **made}
    return model


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
