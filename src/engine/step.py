"""One optimizer step and the ranks' agreement on it: forward, loss in FP32, backward, clip, step, aux step.

Everything here takes plain values (a ``Trainer`` of built objects, a frozen
``StepConfig``); the flags were read once, in ``src.engine.setup``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from tqdm import tqdm

from src.checkpoint import unwrap
from src.cli import UserError
from src.distributed import all_gather_objects, all_reduce_sum
from src.engine.state import TrainState
from src.engine.trainer import StepConfig, Trainer
from src.precision import OverflowMonitor


class TrainingStopped(UserError):
    """The run stopped on purpose (overflow check, non-finite steps, a diverged model); the last good checkpoint stays.

    Every checkpoint a run writes is *good*: its weights are finite, its val
    metrics are finite and the latents of its first val batch are codable
    (``src.codec.latents.check_codable``). These are checked before each save
    (``src.engine.loop.unfit_to_save``); a model that fails them stops the run instead.
    Its exit code (3) tells a scheduler "the run diverged" apart from "the command was wrong" (2).
    """

    exit_code = 3


def last_good_checkpoint(state: TrainState, config: StepConfig) -> str:
    """What the messages that stop a run say about the saved state: never a file this run did not write."""
    if state.last_saved is not None:
        return f"last good checkpoint: {state.last_saved}"
    earlier = " (the last.pt there is an earlier run's, left as it was)" if config.last_checkpoint.exists() else ""
    return f"no checkpoint was written by this run{earlier}"


# ---------------------------------------------------------------- the ranks' agreement

@dataclass
class StepVerdict:
    """What all ranks agreed on after a step's backward."""

    skip: torch.Tensor  # device bool: some rank had an empty batch, a non-finite loss or non-finite gradients
    stop: bool  # a signal asked to stop after this step
    overflow: Optional[str]  # --overflow_check: where the first rank that overflowed saw it
    skip_on_host: Optional[bool] = None  # the skip verdict, when it was read back (the per-step path)


def agree_on_step(tr: Trainer, bad: torch.Tensor, overflow: Optional[str]) -> StepVerdict:
    """Skip, stop and overflow, agreed by all ranks in one collective read back on the host.

    A step with a NaN loss or an inf gradient must not reach the optimizer, and
    under DDP every rank has to make the same choice, or the ranks' collectives
    drift apart and hang. This path syncs the host every step; the deferred
    one (``agree_on_device``) does not.
    """
    flags = torch.stack([bad.float(), torch.tensor(float(tr.stop.requested), device=tr.device),
                         torch.tensor(float(overflow is not None), device=tr.device)])
    flags = all_reduce_sum(flags, tr.dist).cpu()
    where = None
    if flags[2] > 0:
        where = next(w for w in all_gather_objects(overflow or "", tr.dist) if w)
    skip = bool(flags[0] > 0)
    return StepVerdict(torch.tensor(skip, device=tr.device), bool(flags[1] > 0), where, skip_on_host=skip)


def agree_on_device(tr: Trainer, bad: torch.Tensor) -> StepVerdict:
    """The skip verdict as a device tensor, all-reduced without a host read (``--log_every`` windows read it).

    A single process sees its stop signal on the host every step; under DDP
    the ranks agree on stopping at the end of each log window (``agree_to_stop``).
    """
    skip = all_reduce_sum(bad.float().reshape(1), tr.dist)[0] > 0
    return StepVerdict(skip, tr.stop.requested and not tr.dist.enabled, None)


def agree_to_stop(tr: Trainer) -> bool:
    """Whether any rank was asked to stop (one collective; under DDP, once per log window)."""
    if not tr.dist.enabled:
        return tr.stop.requested
    flag = torch.tensor([float(tr.stop.requested)], device=tr.device)
    return bool(all_reduce_sum(flag, tr.dist).cpu()[0] > 0)


# ---------------------------------------------------------------- the step

def train_step(tr: Trainer, x: torch.Tensor) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Optional[str]]:
    """Forward under autocast and the loss in FP32: (model output, loss parts, overflow report or None)."""
    if tr.monitor is not None:
        tr.monitor.reset()
    with tr.autocast():
        output = tr.model(x)
    parts = tr.criterion(output, x)
    overflow = overflow_report(tr.monitor, parts["total"], tr.config.overflow_tol) if tr.monitor is not None else None
    return output, parts, overflow


def backward_and_clip(tr: Trainer, loss: torch.Tensor) -> torch.Tensor:
    """Backward (scaled under fp16), unscale + clip; returns whether the gradients are finite (device bool).

    With fp16 the GradScaler owns inf gradients (it skips the step and lowers
    its scale), so they are reported finite here. Without it (bf16, fp32) an
    inf gradient would make the clip coefficient NaN and the weights NaN for
    good: the total norm that clipping computes anyway is the check.
    """
    params = [p for group in tr.optimizer.param_groups for p in group["params"]]
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    if tr.config.max_grad_norm > 0:
        tr.scaler.unscale_(tr.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, tr.config.max_grad_norm)
    elif not tr.scaler.is_enabled():
        grads = [p.grad for p in params if p.grad is not None]  # get_total_norm is torch >= 2.6 only
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    else:
        return torch.ones((), dtype=torch.bool, device=tr.device)
    return torch.isfinite(norm) | torch.tensor(tr.scaler.is_enabled(), device=tr.device)


def step_optimizers(tr: Trainer, skip: Optional[torch.Tensor] = None) -> None:
    """Optimizer step (through the scaler), then the aux (quantiles) step.

    With ``skip`` (a device bool) the fused optimizers skip on the device: it
    is handed to them as ``found_inf``, the tensor through which GradScaler
    tells a fused Adam to leave weights, moments and step count untouched.
    """
    if skip is not None:
        tr.optimizer.found_inf = skip.float()
    try:
        tr.scaler.step(tr.optimizer)
    finally:
        tr.optimizer.__dict__.pop("found_inf", None)
    tr.scaler.update()
    if tr.aux_optimizer is not None:
        tr.aux_optimizer.zero_grad(set_to_none=True)
        unwrap(tr.model).aux_loss().backward()
        if skip is not None:
            tr.aux_optimizer.found_inf = skip.float()
        try:
            tr.aux_optimizer.step()
        finally:
            tr.aux_optimizer.__dict__.pop("found_inf", None)


def drop_step(tr: Trainer) -> None:
    """Forget this step's gradients (and, under fp16, let the scaler lower its scale)."""
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.scaler.is_enabled():
        tr.scaler.update()


def training_step(tr: Trainer, x: Optional[torch.Tensor],
                  state: TrainState) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], StepVerdict]:
    """One optimizer step as the recipe says: forward, loss in FP32, backward, unscale + clip, step, aux step.

    ``x`` is None when every image of this rank's batch was unreadable. Every
    rank still runs forward and backward (on a placeholder whose loss counts
    0): under DDP a rank that skipped them would leave the others waiting in
    the gradient all-reduce. Then all ranks agree to step or to skip: on the
    device with the fused optimizers (``tr.deferred_skip``), else on the host.
    """
    empty = x is None
    x = tr.placeholder.to(tr.device) if empty else x
    output, parts, overflow = train_step(tr, x)
    finite_grads = backward_and_clip(tr, parts["total"] * (0.0 if empty else 1.0))
    bad = torch.tensor(empty, device=tr.device) | ~torch.isfinite(parts["total"]) | ~finite_grads
    if tr.deferred_skip:
        verdict = agree_on_device(tr, bad)
        step_optimizers(tr, skip=verdict.skip)
        return output, parts, verdict
    verdict = agree_on_step(tr, bad, overflow)
    if verdict.overflow is not None:
        raise TrainingStopped(f"overflow at step {state.steps_run}: {verdict.overflow}; "
                              f"{last_good_checkpoint(state, tr.config)}")
    count_nonfinite(state, verdict.skip_on_host, tr.config, step=state.steps_run, loud=tr.dist.is_main)
    if verdict.skip_on_host:
        drop_step(tr)
    else:
        step_optimizers(tr)
    return output, parts, verdict


def count_nonfinite(state: TrainState, skipped: bool, config: StepConfig, step: int, loud: bool = True) -> None:
    """Count a skipped ``step``; stop after ``--max_bad_steps`` in a row."""
    if not skipped:
        state.nonfinite_in_a_row = 0
        return
    state.nonfinite_in_a_row += 1
    state.nonfinite_total += 1
    if loud:
        tqdm.write(f"warning: step {step}: non-finite loss or gradients, or an empty batch, step skipped "
                   f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_total} in all)")
    if state.nonfinite_in_a_row >= config.max_bad_steps:
        raise TrainingStopped(f"{state.nonfinite_in_a_row} non-finite steps in a row at step {step}; "
                              "rerun with --overflow_check true to find the module, or lower --lr; "
                              f"{last_good_checkpoint(state, config)}")


def overflow_report(monitor: OverflowMonitor, loss: torch.Tensor, tolerance: float) -> Optional[str]:
    """None when the forward stayed in range; else where it broke (shared with every rank)."""
    bad = monitor.first_bad()
    if bad is None and bool(torch.isfinite(loss)):
        return None
    where = f"first bad output in module '{bad}'" if bad else "the loss is not finite"
    return f"{where} (NaN/Inf or |x| > {tolerance:g})"
