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

import random
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from src.cli import UserError
from src.images import DECODE_ERRORS, crop_image, list_images, load_rgb


def image_files(folder: Path, what: str) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} not found")
    files = list_images(folder)
    if not files:
        raise UserError(f"{what} folder {folder} holds no images")
    return files


def read_or_report(path: Path, read) -> Optional[torch.Tensor]:
    """``read(path)``, or None with the file named on stderr when it cannot be decoded.

    A corrupt file met mid-run (in a DataLoader worker) must not end a long
    training run; ``src.loaders.collate_skipping_bad`` drops the None.
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
        raise UserError(f"--coco_dir {coco_dir} not found")
    if use_prepared:
        if not (coco_dir / "train").is_dir():
            raise UserError(f"{coco_dir}/train not found: --use_prepared true expects the --out_dir of "
                            "scripts.coco_prepare (or pass --use_prepared false for raw COCO)")
        return PreparedCrops(coco_dir / "train"), PreparedCrops(coco_dir / "val")
    return (RawCocoCrops(coco_dir / "train2017", crop_size, random_crop=True, seed=seed),
            RawCocoCrops(coco_dir / "val2017", crop_size, random_crop=False))


def crop_side(dataset: Dataset) -> int:
    """Side of the (square) crops a dataset yields, read from its first readable item."""
    first = next((item for item in (dataset[i] for i in range(len(dataset))) if item is not None), None)
    if first is None:
        raise UserError("no image of the dataset could be decoded")
    return int(min(first.shape[-2:]))
