"""torch.distributed plumbing: the engine asks these helpers, it does not know how.

``torchrun --nproc_per_node=N -m src.train_finetune_relu ...`` sets RANK,
WORLD_SIZE and LOCAL_RANK; ``init_distributed`` reads them and starts a
process group (NCCL on CUDA, gloo on CPU). Without them everything here is a
no-op for a single process. Each rank sees ``--batch_size`` images per step,
so the effective batch is ``batch_size * world_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Start the process group when launched by torchrun; a single-process DistInfo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (in place); identity for one process."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def agree_on_error(message: str, info: DistInfo) -> str:
    """The first rank's non-empty ``message`` ("" when no rank has one), known to every rank.

    A check that only rank 0 makes (a lock, the output folders) must stop
    every rank, and at the same point: a rank left waiting in a later
    collective would hang, or die with gloo's own traceback.
    """
    return next((m for m in all_gather_objects(message, info) if m), "")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
