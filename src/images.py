"""Reading real-world photos as 8-bit RGB, and the crop geometry of the recipe.

COCO2017 is not clean: it holds grayscale and CMYK JPEGs, EXIF-rotated phone
photos, palette PNGs and a few images smaller than the crop. Everything that
reads a photo (data preparation, raw-COCO training, eval) goes through
``load_rgb`` so that all of them see the same pixels.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What PIL raises for an empty, truncated, corrupt or non-image file.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def list_images(folder: Path) -> List[Path]:
    """Image files directly inside ``folder``, sorted by name (a stable order)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; deep (16/32-bit, float) modes are rescaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            peak = 1.0
        gray = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode in ("P", "PA", "LA", "RGBA", "La"):
        # Alpha is dropped (composited on black), like a JPEG decoder would see it.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` fully, apply its EXIF orientation and return 8-bit RGB.

    Raises the PIL/OS error of a corrupt, truncated or non-image file; callers
    decide whether that skips the file or stops the run.
    """
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_8bit_rgb(img)


def center_crop_box(width: int, height: int, size: int) -> Tuple[int, int, int, int]:
    left = (width - size) // 2
    top = (height - size) // 2
    return left, top, left + size, top + size


def random_crop_box(width: int, height: int, size: int, rng: random.Random) -> Tuple[int, int, int, int]:
    left = rng.randint(0, width - size)
    top = rng.randint(0, height - size)
    return left, top, left + size, top + size


def upscale_to_fit(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side equals ``size`` (bicubic), keeping the aspect."""
    width, height = img.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return img.resize(new_size, Image.BICUBIC)
