"""Reading real-world photos as 8-bit RGB, and the crop geometry of the recipe.

COCO2017 is not clean: it holds grayscale and CMYK JPEGs, EXIF-rotated phone
photos, palette PNGs and a few images smaller than the crop. Everything that
reads a photo (data preparation, raw-COCO training, eval) goes through
``load_rgb`` so that all of them see the same pixels.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from src.cli import UserError

# What PIL raises for an empty, truncated, corrupt or non-image file, or one whose header claims more pixels than
# PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` * 2; a 109 KB PNG can claim 30000 x 30000).
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def list_images(folder: Path) -> List[Path]:
    """Image files directly inside ``folder``, sorted by name (a stable order)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def unusable_entries(folder: Path) -> Dict[Path, str]:
    """Entries of ``folder`` with an image's name that ``list_images`` passes over, each with why.

    ``not_a_file`` (a FIFO, socket or device: reading a FIFO would block),
    ``dangling_link`` (its target is gone), ``link_loop`` (links that point at
    each other); folders are not counted. So a tool can say what it skipped.
    """
    found = {}
    for path in Path(folder).iterdir():
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_file() or path.is_dir():
            continue
        if path.is_symlink():
            try:
                path.resolve(strict=True)
                found[path] = "not_a_file"
            except RuntimeError:  # Python 3.11 resolve() on a link loop
                found[path] = "link_loop"
            except OSError as err:
                found[path] = "link_loop" if err.errno == errno.ELOOP else "dangling_link"
        else:
            found[path] = "not_a_file"
    return dict(sorted(found.items()))


def sample_bits(img: Image.Image) -> Optional[int]:
    """Bits per sample the file declares, read from the raw mode Pillow decodes it with (before ``load``).

    A 16-bit PNG decodes from raw mode ``I;16B`` (gray) or ``RGB;16B`` / ``RGBA;16B`` / ``LA;16B`` on
    every Pillow, whichever mode (``I;16``, ``I;16B``, ``I``, ``RGB``, ...) the image is then given;
    16-bit TIFF and PGM use ``I;16*`` raw modes too. None when no tile says (e.g. an image made in memory).
    """
    for tile in getattr(img, "tile", None) or ():
        args = tile[3]
        rawmode = args if isinstance(args, str) else next((a for a in args or () if isinstance(a, str)), "")
        if ";16" in rawmode:
            return 16
    return 16 if img.mode.startswith("I;16") else None


def _to_8bit_rgb(img: Image.Image, bits: Optional[int] = None) -> Image.Image:
    """Convert any PIL mode to RGB; deep (16/32-bit, float) modes are rescaled, not clipped.

    A sample v of a B-bit file means v / (2**B - 1) of full scale, as the PNG
    spec and every viewer read it: values 0-255 in a 16-bit file are nearly
    black, not an 8-bit picture. A 16-bit sample becomes its high byte,
    ``v >> 8`` (= floor(v / 256)), which is what Pillow's own decoders of
    16-bit RGB, RGBA and gray+alpha PNGs do; so gray and colour 16-bit files
    agree, gray gives the same pixels in every mode a Pillow version opens it
    in (``I;16``, ``I;16B``, ``I``), and 8-bit values widened the standard way
    (``v * 257``) come back exactly. ``bits`` is the file's depth
    (``sample_bits``); mode ``I`` or ``F`` without a declared 16-bit depth
    (32-bit or float TIFF) is scaled by its own range.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or (img.mode == "I" and bits == 16):
        gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
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


def load_rgb(path: Path, check_size: Optional[Callable[[int, int], None]] = None) -> Image.Image:
    """Decode ``path`` fully, apply its EXIF orientation and return 8-bit RGB (scaled as ``_to_8bit_rgb`` says).

    Raises the PIL/OS error of a corrupt, truncated, non-image or
    decompression-bomb file, and ``ValueError`` for an animation (a GIF, APNG
    or WebP of several frames: which frame would be meant?); callers decide
    whether that skips the file or stops the run. ``check_size(width, height)``
    runs on the header's size before any pixel is decoded (and may raise).
    """
    with Image.open(path) as img:
        if getattr(img, "is_animated", False) and img.format in ANIMATED_FORMATS:
            raise ValueError(f"an animated {img.format} of {img.n_frames} frames; give one frame as an image")
        if check_size is not None:
            check_size(*img.size)
        bits = sample_bits(img)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_8bit_rgb(img, bits)


def decode_reason(err: BaseException) -> str:
    """The first line of a decoder's error, short enough for a one-line message."""
    return ((str(err).strip().splitlines() or [type(err).__name__])[0])[:120]


def read_rgb(path: Path, what: str, check_size: Optional[Callable[[int, int], None]] = None) -> Image.Image:
    """``load_rgb`` for a single image a command was given: a missing or undecodable file is one ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return load_rgb(path, check_size)
    except DECODE_ERRORS as err:
        raise UserError(f"{what} {path} cannot be read as an image ({decode_reason(err)})") from None


def center_crop_box(width: int, height: int, size: int, size_h: Optional[int] = None) -> Tuple[int, int, int, int]:
    """The centered ``size`` x ``size_h`` (default square) box of a ``width`` x ``height`` image, as PIL wants it.

    Offsets round down. torchvision's ``center_crop`` rounds them to nearest,
    which would move the recipe's existing val crops by a pixel, so it is not used.
    """
    size_h = size if size_h is None else size_h
    left = (width - size) // 2
    top = (height - size_h) // 2
    return left, top, left + size, top + size_h


def random_crop_box(width: int, height: int, size: int, rng: random.Random) -> Tuple[int, int, int, int]:
    left = rng.randint(0, width - size)
    top = rng.randint(0, height - size)
    return left, top, left + size, top + size


def fit_for_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """``img``, upscaled (bicubic, aspect kept) when it is smaller than a ``width`` x ``height`` crop."""
    if img.size[0] < width or img.size[1] < height:
        return upscale_to_fit(img, max(width, height))
    return img


def crop_image(img: Image.Image, size: int, rng: Optional[random.Random] = None) -> Image.Image:
    """The recipe's crop of one image: fitted first, then a random box (with ``rng``) or the centered one."""
    img = fit_for_crop(img, size, size)
    box = random_crop_box(*img.size, size, rng) if rng is not None else center_crop_box(*img.size, size)
    return img.crop(box)


def image_tensor(img: Image.Image) -> torch.Tensor:
    """An 8-bit RGB image as a (1, 3, H, W) float tensor in [0, 1]."""
    return pil_to_tensor(img).float().div(255).unsqueeze(0)


def center_crop_tensor(path: Path, size: Tuple[int, int]) -> torch.Tensor:
    """A real photo center-cropped to ``size`` (H, W), as (1, 3, H, W) float in [0, 1]."""
    h, w = size
    img = fit_for_crop(load_rgb(path), w, h)
    return image_tensor(img.crop(center_crop_box(*img.size, w, h)))


def upscale_to_fit(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side equals ``size`` (bicubic), keeping the aspect."""
    width, height = img.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return img.resize(new_size, Image.BICUBIC)
