"""Datasets for training and eval: prepared PNG crops, or raw COCO with on-the-fly crops.

``--use_prepared true``: ``--coco_dir`` is the output of ``scripts.coco_prepare``
and holds ``train/`` and ``val/``. ``--use_prepared false``: ``--coco_dir`` is
the COCO root with ``train2017/`` and ``val2017/``; train images get a random
crop whose offset depends on (seed, epoch, index) only -- not on the worker or
the rank that loads it -- so a resumed run sees the crops a straight one would
(the training loader asks for ``(epoch, index)`` keys); val images get a
center crop. Sorted file names fix the val order, which is the recon index.

Items are uint8 (3, H, W) tensors, as decoded: workers ship a quarter of
float32's bytes through shared and pinned memory, and ``to_unit_float``
turns a batch into float in [0, 1] on the device after a non-blocking copy.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import random
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Subset,
                              default_collate)
from torchvision.transforms.functional import pil_to_tensor

from src.cli import UserError
from src.distributed import DistInfo
from src.images import DECODE_ERRORS, crop_image, list_images, load_rgb
from src.losses import msssim_window


def not_a_folder(path: Path) -> str:
    """Why ``path`` is not a folder we can read: "not found" or "is a file, not a folder"."""
    return "is a file, not a folder" if Path(path).exists() else "not found"


def image_files(folder: Path, what: str) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} {not_a_folder(folder)}")
    files = list_images(folder)
    if not files:
        raise UserError(f"{what} folder {folder} holds no images")
    return files


def read_or_report(path: Path, read) -> Optional[torch.Tensor]:
    """``read(path)``, or None with the file named on stderr when it cannot be decoded.

    A corrupt file met mid-run (in a DataLoader worker) must not end a long
    training run; ``collate_skipping_bad`` (below) drops the None.
    """
    try:
        return read(path)
    except DECODE_ERRORS as err:
        print(f"warning: skipping unreadable image {path} ({str(err).splitlines()[0][:120]})",
              file=sys.stderr, flush=True)
        return None


def _prepared_tensor(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return pil_to_tensor(img.convert("RGB"))


def to_unit_float(batch: torch.Tensor, device: torch.device,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> float32 in [0, 1] on ``device``: copy first (non-blocking), convert there."""
    batch = batch.to(device, non_blocking=True)
    return batch.to(dtype=torch.float32, memory_format=memory_format).div_(255.0)


class PreparedCrops(Dataset):
    """Fixed-size PNG crops written by ``scripts.coco_prepare``, as uint8 tensors (3, H, W)."""

    def __init__(self, folder: Path):
        self.files = image_files(folder, "prepared")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Optional[torch.Tensor]:
        return read_or_report(self.files[index], _prepared_tensor)


class RawCocoCrops(Dataset):
    """COCO JPEGs cropped on the fly: random crops for training, center crops otherwise.

    A random crop is keyed by ``(epoch, index)``: ``dataset[(epoch, index)]``
    draws its offset from an RNG seeded by (seed, epoch, index) alone.
    ``dataset[index]`` gives the center crop.
    """

    keyed_by_epoch = True

    def __init__(self, folder: Path, crop_size: int, random_crop: bool, seed: int = 0):
        self.files = image_files(folder, "COCO")
        self.crop_size, self.random_crop, self.seed = crop_size, random_crop, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> Optional[torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        return read_or_report(self.files[index], lambda path: self._crop(path, epoch, index))

    def _crop(self, path: Path, epoch: Optional[int], index: int) -> torch.Tensor:
        rng = random.Random(f"{self.seed}/{epoch}/{index}") if self.random_crop and epoch is not None else None
        return pil_to_tensor(crop_image(load_rgb(path), self.crop_size, rng))


def build_datasets(coco_dir: Path, use_prepared: bool, crop_size: int, seed: int = 0) -> Tuple[Dataset, Dataset]:
    """(train, val) datasets; a missing folder or one without images is a UserError."""
    coco_dir = Path(coco_dir)
    if not coco_dir.is_dir():
        raise UserError(f"--coco_dir {coco_dir} {not_a_folder(coco_dir)}")
    if use_prepared:
        if not (coco_dir / "train").is_dir():
            raise UserError(f"{coco_dir}/train {not_a_folder(coco_dir / 'train')}: --use_prepared true expects the "
                            "--out_dir of scripts.coco_prepare (or pass --use_prepared false for raw COCO)")
        return PreparedCrops(coco_dir / "train"), PreparedCrops(coco_dir / "val")
    return (RawCocoCrops(coco_dir / "train2017", crop_size, random_crop=True, seed=seed),
            RawCocoCrops(coco_dir / "val2017", crop_size, random_crop=False))


def crop_side(dataset: Dataset, what: str = "train") -> int:
    """Side of the (square) crops a dataset yields, read from its first readable item."""
    first = next((item for item in (dataset[i] for i in range(len(dataset))) if item is not None), None)
    if first is None:
        raise UserError(f"no image of the {what} set ({Path(dataset.files[0]).parent}) could be decoded")
    return int(min(first.shape[-2:]))


def header_size(path: Path) -> Optional[Tuple[int, int]]:
    """(width, height) from the file's header (nothing decoded), or None when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.size
    except DECODE_ERRORS:
        return None


def prepared_side(dataset: "PreparedCrops", what: str) -> int:
    """The one square size of every crop of a prepared folder, read from the headers (a UserError otherwise).

    Batches stack crops: a folder that mixes sizes (an interrupted
    ``coco_prepare`` rerun with another ``--crop_size``) or holds non-square
    crops would stop the run in ``torch.stack`` at some batch; this finds it
    before the first step. Unreadable headers are left to the loader, which
    skips such files by name.
    """
    sizes = collections.Counter()
    example = {}
    for path in dataset.files:
        size = header_size(path)
        if size is not None:
            sizes[size] += 1
            example.setdefault(size, path)
    if not sizes:
        return crop_side(dataset, what)  # no header reads: crop_side names the folder that cannot be decoded
    (width, height), _ = sizes.most_common(1)[0]
    folder = Path(dataset.files[0]).parent
    if len(sizes) > 1:
        counts = ", ".join(f"{w}x{h}: {n} (e.g. {example[(w, h)].name})" for (w, h), n in sizes.most_common(4))
        raise UserError(f"prepared {what} folder {folder} mixes crop sizes ({counts}); prepare it again into an "
                        "empty --out_dir")
    if width != height:
        raise UserError(f"prepared {what} folder {folder} holds {width}x{height} crops; training needs square crops "
                        "(prepare them with scripts.coco_prepare)")
    return width


def check_crop_fits(dataset: "RawCocoCrops", what: str) -> None:
    """Refuse a ``--crop_size`` larger than every image of a raw COCO folder, reading headers only.

    Smaller images are upscaled to the crop, so a crop beyond every image
    would upscale all of them (a 4096-px crop of 640-px photos takes ~50 MiB
    per image, the OOM killer's business) before any message. The scan stops
    at the first image large enough, usually the first.
    """
    largest = 0
    for path in dataset.files:
        size = header_size(path)
        if size is not None:
            if min(size) >= dataset.crop_size:
                return
            largest = max(largest, min(size))
    if largest:
        raise UserError(f"--crop_size {dataset.crop_size} is larger than every image of "
                        f"{Path(dataset.files[0]).parent} "
                        f"(the largest short side is {largest}px); pass --crop_size {largest // 16 * 16} or less")


def data_fingerprint(train: Dataset, val: Dataset) -> Dict[str, Any]:
    """What identifies a dataset for ``--resume``: file counts and a hash of (name, size) of every file.

    A resumed run must see the data it started on: another folder changes the
    steps per epoch, the samples of each step and the val set that
    ``best_*.pt`` are chosen on. Names and sizes are read from the directory
    (no file is opened), so moving the data elsewhere keeps the fingerprint.
    """
    digest = hashlib.sha256()
    for split, dataset in (("train", train), ("val", val)):
        for path in dataset.files:
            line = f"{split}/{Path(path).name}\t{Path(path).stat().st_size}\n"
            digest.update(line.encode("utf-8", "surrogateescape"))
    return {"train_files": len(train), "val_files": len(val), "sha256": digest.hexdigest()[:16]}


def fingerprint_change(saved: Dict[str, Any], now: Dict[str, Any]) -> Optional[str]:
    """``train 24 -> 30 files, ...`` when the data differs from the fingerprint a run saved, else None."""
    if saved == now:
        return None
    parts = [f"{split} {saved.get(key)} -> {now[key]} files" for split, key in (("train", "train_files"),
                                                                                ("val", "val_files"))
             if saved.get(key) != now[key]]
    return "; ".join(parts) or "same counts, other file names or sizes"


# ---------------------------------------------------------------- loaders
# DataLoaders whose order depends on (seed, epoch) only, can resume mid-epoch, and survive bad files.
#
# - Train order: ``RandomSampler`` with a generator re-seeded every epoch, or
#   ``DistributedSampler.set_epoch`` under torchrun. Either way epoch e sees the
#   same order in a straight run and in a resumed one.
# - ``ResumableBatchSampler`` skips the batches an interrupted epoch already
#   trained, without loading them.
# - A file that fails to decode in a worker is reported by name and dropped
#   from its batch (``collate_skipping_bad``); the run goes on.

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
        # ``skip`` holds for every iterator made in this epoch (``EpochLoader.epoch`` sets it): a DataLoader with
        # workers calls ``iter()`` on its batch sampler twice (in ``_BaseDataLoaderIter.__init__`` and again in
        # ``_MultiProcessingDataLoaderIter._reset``) and reads the second, so a skip consumed by the first would
        # restart a resumed epoch from its first batch.
        batches = itertools.islice(super().__iter__(), self.skip, None)
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
        self.seed, self.rank = seed, dist.rank
        # Its own generator under DDP too: each iter() draws the workers' base seed from the loader's generator,
        # or from the global RNG without one, which would shift the training noise that follows; a resumed
        # epoch draws it again (the draw of the straight run happened before the saved RNG state).
        self.generator = torch.Generator()
        if dist.enabled:
            self.sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                              seed=seed, drop_last=True)
        else:
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
        self.generator.manual_seed(self.seed * 1_000_003 + epoch + self.rank * 1_000_000_007)
        if isinstance(self.sampler, DistributedSampler):
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


def check_datasets(train_ds: Dataset, val_ds: Dataset, crop_size: Optional[int], coco_dir: Path) -> Tuple[int, int]:
    """(train crop side, val crop side), once train and val are known to be usable.

    Prepared folders must hold one square size each (read from the headers);
    ``--crop_size`` may not contradict it. Raw COCO needs an image at least
    as large as the crop. Either way one image of each split must decode: an
    unreadable val set would otherwise show only after a whole epoch.
    """
    if isinstance(train_ds, PreparedCrops):
        side = prepared_side(train_ds, "train")
        prepared_side(val_ds, "val")  # val too must be one square size
        if crop_size is not None and crop_size != side:
            raise UserError(f"--crop_size {crop_size} contradicts the prepared crops in {coco_dir} "
                            f"({side}px): prepared crops keep the size they were made at; drop --crop_size, or "
                            "prepare crops of that size")
    else:
        check_crop_fits(train_ds, "train")
        check_crop_fits(val_ds, "val")
    sides = crop_side(train_ds, "train"), crop_side(val_ds, "val")
    for what, side in zip(("train", "val"), sides):
        try:
            msssim_window(side)  # val MS-SSIM is measured whatever the loss
        except ValueError as err:
            raise UserError(f"{what} crops of {side}px are too small for MS-SSIM's 5 scales ({err}); "
                            "use larger crops") from None
    return sides
