"""Learning-rate schedules from ``torch.optim.lr_scheduler``, plus a per-step linear warmup.

cosine and plateau step once per epoch, onecycle once per optimizer step.
The warmup is a ``LinearLR`` stepped per optimizer step for the first
``--lr_warmup_steps`` steps. ``LinearLR``, ``CosineAnnealingLR`` and
``ReduceLROnPlateau`` are chainable (each scales the current LR), so the LR is
``base * warmup(step) * main(epoch)``. ``SequentialLR`` cannot carry plateau
(it needs a metric) and would mix per-step and per-epoch counting, hence two
schedulers side by side. OneCycleLR has its own warmup phase
(``--onecycle_pct_start``): combining it with ``--lr_warmup_steps`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

SCHEDULES = ("none", "cosine", "onecycle", "plateau")


@dataclass
class LRSchedule:
    main: Optional[Any]
    warmup: Optional[sched.LinearLR]
    warmup_steps: int
    kind: str

    def after_step(self, step: int) -> None:
        """Call after optimizer step number ``step`` (0-based)."""
        if self.warmup is not None and step < self.warmup_steps - 1:
            self.warmup.step()
        if self.kind == "onecycle":
            self.main.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.kind == "cosine":
            self.main.step()
        elif self.kind == "plateau":
            self.main.step(val_loss)

    def state_dict(self) -> Dict[str, Any]:
        return {"main": self.main.state_dict() if self.main else None,
                "warmup": self.warmup.state_dict() if self.warmup else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.main is not None and state.get("main") is not None:
            self.main.load_state_dict(state["main"])
        if self.warmup is not None and state.get("warmup") is not None:
            self.warmup.load_state_dict(state["warmup"])


def check_schedule(kind: str, warmup_steps: int) -> None:
    """The schedule flags' rules (ValueError): the one place they are written, read at parse time and here."""
    if kind not in SCHEDULES:
        raise ValueError(f"sched must be one of {SCHEDULES}, got {kind!r}")
    if kind == "onecycle" and warmup_steps > 0:
        raise ValueError("--lr_warmup_steps cannot be combined with --sched onecycle "
                         "(OneCycleLR warms up by itself: use --onecycle_pct_start)")


def build_schedule(optimizer: Optimizer, kind: str, epochs: int, steps_per_epoch: int, lr: float,
                   warmup_steps: int = 0, onecycle_pct_start: float = 0.3) -> LRSchedule:
    check_schedule(kind, warmup_steps)
    # The warmup multiplies the LR first, so it is built before the main schedule
    # records the optimizer's initial LR.
    warmup = None
    if warmup_steps > 1:
        warmup = sched.LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0,
                                total_iters=warmup_steps - 1)
    main: Optional[Any] = None
    if kind == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    elif kind == "plateau":
        main = sched.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
    elif kind == "onecycle":
        main = sched.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch),
                                pct_start=onecycle_pct_start)
    return LRSchedule(main, warmup, warmup_steps, kind)
