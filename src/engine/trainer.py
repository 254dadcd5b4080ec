"""What a training step is built from: the frozen ``Trainer`` and ``StepConfig`` (``src.engine.setup`` builds them).

Their own module, so that the step (which runs them) and the saved state (which writes their model and
optimisers into a checkpoint) both use them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from src.cli import StopRequest
from src.distributed import DistInfo
from src.losses import RecipeLoss
from src.precision import OverflowMonitor
from src.run_logger import RunLogger
from src.schedule import LRSchedule


@dataclass(frozen=True)
class StepConfig:
    """What the training step reads from the flags (built by ``src.engine.setup.step_config``)."""

    max_grad_norm: float = 1.0  # <= 0: no clipping
    max_bad_steps: int = 20  # skipped steps in a row that stop the run
    overflow_tol: float = 1e8  # --overflow_check: |activation| above this counts as an overflow
    log_every: int = 50  # steps per logging window (and, on the fused path, per host read)
    lambda_bpp: float = 0.01  # logged with the rate
    last_checkpoint: Path = Path("checkpoints/last.pt")  # named in the messages that stop a run


@dataclass(frozen=True)
class Trainer:
    """What one training step needs, built once (``src.engine.setup.build_trainer``) and never changed."""

    model: nn.Module
    criterion: RecipeLoss
    optimizer: torch.optim.Optimizer
    aux_optimizer: Optional[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    schedule: LRSchedule
    autocast: Callable
    device: torch.device
    dist: DistInfo
    monitor: Optional[OverflowMonitor]
    logger: RunLogger
    stop: StopRequest
    config: StepConfig = StepConfig()
    placeholder: Optional[torch.Tensor] = None  # stands in for an all-corrupt batch: (1, 3, crop, crop) zeros
    deferred_skip: bool = False  # skip bad steps on the device, read the verdicts back once per log window
    memory_format: torch.memory_format = torch.contiguous_format  # of the batches (--channels_last)
