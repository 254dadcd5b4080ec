"""``run_training``: validate the flags, build the run, resume, run the epochs, summarise.

Reads like a reference ``main``; what each line does lives in ``setup``
(flags -> objects), ``loop`` (the epochs), ``step`` (one optimizer step) and
``state`` (checkpoints, resume, output folders).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Dict, Optional

import torch

from src.checkpoint import unwrap
from src.distributed import DistInfo, all_reduce_sum, init_distributed, shutdown
from src.engine.loop import run_epochs, weights_checksum, write_recon_report
from src.engine.setup import GdnFit, Run, build_run, output_config, requested_device
from src.engine.state import claim_outputs
from src.train_args import validate_args


def run_training(args: argparse.Namespace, replace: str, enc_kwargs: Optional[Dict[str, Any]] = None,
                 dec_kwargs: Optional[Dict[str, Any]] = None, gdn_fit: Optional[GdnFit] = None) -> Dict[str, Any]:
    """Train as the flags say; returns a summary (per-epoch metrics, best val MS-SSIM, the model).

    ``replace``, ``enc_kwargs``, ``dec_kwargs``: the architecture a script's
    ``build_model`` made (``src.train_args.replacement_built_by``); ``gdn_fit``:
    fit the new blocks to GDN first (the NPU script's ``--init_from_gdn``).
    """
    validate_args(args)
    device = requested_device(args)
    dist = init_distributed(device.type)
    try:
        with claim_outputs(output_config(args), dist):
            run = build_run(args, replace, enc_kwargs, dec_kwargs, device, dist, gdn_fit)
            return train(run, dist)
    finally:
        shutdown(dist)


def train(run: Run, dist: DistInfo) -> Dict[str, Any]:
    """The built run's epochs, the recon sheet, and the summary."""
    tr, state = run.tr, run.state
    say: Callable[..., None] = print if dist.is_main else (lambda *a, **k: None)
    with tr.stop:  # from here on SIGINT/SIGTERM finish the step and save
        say(run.banner, flush=True)
        try:
            epochs = run_epochs(tr, state, run.arch, run.train_loader, run.val_ds, run.val_batches, run.loop,
                                run.out, run.kept, run.replaces, say)
            if dist.is_main and run.loop.recon_count > 0:
                write_recon_report(tr, run.loop.recon_dir, state.steps_run, say)
        finally:
            if tr.monitor is not None:
                tr.monitor.remove()
            tr.logger.finish()
    # -- summary: the same weights on every rank
    checksum = weights_checksum(tr.model)
    sums = all_reduce_sum(torch.tensor([checksum], dtype=torch.float64, device=tr.device), dist).item()
    say(f"done: {state.steps_run} steps; weights checksum {checksum:.6e}"
        + (f" (same on all {dist.world_size} ranks)" if dist.enabled and
           math.isclose(sums, checksum * dist.world_size, rel_tol=1e-12) else ""))
    return {"epochs": epochs, "best_msssim": state.best_msssim, "best_loss": state.best_loss,
            "steps": state.steps_run, "arch": run.arch, "model": unwrap(tr.model), "checksum": checksum,
            "nonfinite_steps": state.nonfinite_total}
