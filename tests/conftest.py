"""Shared test data: real photographs shipped with scikit-image, laid out like COCO.

Tests never touch the network or files outside the repository; everything is
built in pytest's tmp dirs from these package-shipped photos.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from scripts import coco_prepare
from src.images import load_rgb
from src.sample_photos import COLOR_PHOTOS, skimage_photos

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def photo_paths():
    return skimage_photos(COLOR_PHOTOS)


def write_coco(root: Path, train: int = 6, val: int = 2, max_side: int = 160) -> Path:
    """COCO-like folders of real photos, downscaled to keep tests fast."""
    photos = photo_paths()
    for split, chosen in (("train2017", photos[:train]), ("val2017", photos[train:train + val])):
        (root / split).mkdir(parents=True, exist_ok=True)
        for index, src in enumerate(chosen):
            img = load_rgb(src)
            img.thumbnail((max_side, max_side), Image.BICUBIC)
            img.save(root / split / f"{index + 1:012d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="session")
def prepared64(tmp_path_factory, coco_root) -> Path:
    """64x64 crops (4 per train photo, 1 per val photo) of the real photos."""
    out = tmp_path_factory.mktemp("coco64")
    coco_prepare.main(["--coco_dir", str(coco_root), "--out_dir", str(out), "--crop_size", "64",
                       "--crops_per_image", "4", "--workers", "1"])
    return out
