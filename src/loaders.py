"""DataLoaders whose order depends on (seed, epoch) only, can resume mid-epoch, and survive bad files.

- Train order: ``RandomSampler`` with a generator re-seeded every epoch, or
  ``DistributedSampler.set_epoch`` under torchrun. Either way epoch e sees the
  same order in a straight run and in a resumed one.
- ``ResumableBatchSampler`` skips the batches an interrupted epoch already
  trained, without loading them.
- A file that fails to decode in a worker is reported by name and dropped
  from its batch (``collate_skipping_bad``); the run goes on.
"""

from __future__ import annotations

import itertools
from typing import Iterator, List, Optional

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Subset,
    default_collate,
)

from src.distributed import DistInfo


class ResumableBatchSampler(BatchSampler):
    """A BatchSampler whose next epoch can start ``skip`` batches in.

    With ``keyed_by_epoch`` it yields ``(epoch, index)`` keys, for datasets
    whose random crops depend on the epoch (it runs in the main process, so the
    epoch reaches persistent workers too).
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool, keyed_by_epoch: bool = False):
        super().__init__(sampler, batch_size, drop_last)
        self.skip, self.epoch, self.keyed_by_epoch = 0, 0, keyed_by_epoch

    def __iter__(self) -> Iterator[List]:
        skip, self.skip = self.skip, 0
        batches = itertools.islice(super().__iter__(), skip, None)
        if not self.keyed_by_epoch:
            return batches
        return ([(self.epoch, index) for index in batch] for batch in batches)


def collate_skipping_bad(batch: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """Stack the good samples; None (a file that failed to decode) is dropped."""
    good = [item for item in batch if item is not None]
    return default_collate(good) if good else None


class EpochLoader:
    """The training DataLoader plus what it needs to start each epoch in the right place."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int, dist: DistInfo,
                 pin_memory: bool, persistent_workers: bool):
        self.seed = seed
        if dist.enabled:
            self.sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                              seed=seed, drop_last=True)
            self.generator = None
        else:
            self.generator = torch.Generator()
            self.sampler = RandomSampler(dataset, generator=self.generator)
        per_rank = len(dataset) // dist.world_size
        self.batch_sampler = ResumableBatchSampler(self.sampler, batch_size, drop_last=per_rank > batch_size,
                                                   keyed_by_epoch=getattr(dataset, "keyed_by_epoch", False))
        self.loader = DataLoader(dataset, batch_sampler=self.batch_sampler, num_workers=num_workers,
                                 collate_fn=collate_skipping_bad, pin_memory=pin_memory,
                                 persistent_workers=persistent_workers and num_workers > 0,
                                 generator=self.generator)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def epoch(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """The loader, positioned at the start of ``epoch`` (plus ``skip_batches``)."""
        if self.generator is not None:
            self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        else:
            self.sampler.set_epoch(epoch)
        self.batch_sampler.skip, self.batch_sampler.epoch = skip_batches, epoch
        return self.loader


def epochs_for_steps(steps: int, crops: int, batch_size: int) -> int:
    """Whole epochs that add up to about ``steps`` optimizer steps over ``crops`` images (at least one).

    Studies and the demo give every run a budget in steps but train whole
    epochs, so that each run's data order is the recipe's own.
    """
    return max(1, round(steps / max(1, crops // batch_size)))


def val_loader(dataset: Dataset, batch_size: int, num_workers: int, dist: DistInfo, pin_memory: bool) -> DataLoader:
    """Val images split rank::world_size (no padding duplicates, so reduced means are exact).

    Its workers persist across epochs (no respawn per validation pass).
    """
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size)) if dist.enabled else dataset
    # Its own generator: starting worker processes draws a seed from the loader's generator, and from the
    # global RNG without one. Persistent workers start once per process, so a resumed run would draw once more
    # than a straight one and shift the training noise that follows.
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_skipping_bad, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(0))
