"""Console and (optional) Weights & Biases logging for a training run.

W&B is imported only when ``--wandb true``; the project comes from
``WANDB_PROJECT`` (default ``gdn-finetune``) and ``WANDB_MODE=offline`` works
without an account. Only rank 0 logs.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from src.cli import UserError


class RunLogger:
    def __init__(self, enabled: bool, config: Dict[str, Any], run_dir: str):
        self.wandb = None
        if not enabled:
            return
        import wandb

        try:
            # WANDB_DIR, when set, is the user's choice; else the files go beside the checkpoints.
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gdn-finetune"), config=config,
                                  dir=os.environ.get("WANDB_DIR") or run_dir)
        except (wandb.errors.UsageError, wandb.errors.CommError, wandb.errors.AuthenticationError) as err:
            raise UserError(f"W&B could not start ({str(err).splitlines()[0]}); run `wandb login`, "
                            "set WANDB_MODE=offline, or pass --wandb false") from None
        self.wandb = wandb

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_image(self, key: str, grid: torch.Tensor, step: int, caption: Optional[str] = None) -> None:
        if self.wandb is not None:
            array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            self.wandb.log({key: self.wandb.Image(array, caption=caption)}, step=step)

    def log_image_file(self, key: str, path, step: int) -> None:
        if self.wandb is not None:
            self.wandb.log({key: self.wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
