"""Reconstruction PNGs: ``recon/origin/NNNNN.png`` beside ``recon/<tag>/NNNNN.png``.

The originals are the first ``--recon_count`` val crops (sorted file order) and
are written once; each tag (``epoch_002``) holds the same indices decoded by
the model at that point, so a file viewer can flip between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from torchvision.utils import make_grid, save_image

from src.checkpoint import write_atomic


def write_pngs(images: torch.Tensor, folder: Path, overwrite: bool = True) -> List[Path]:
    """Write a batch in [0, 1] as ``folder/00000.png, 00001.png, ...``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:05d}.png"
        if overwrite or not path.exists():
            pixels = image.float().clamp(0, 1).cpu()
            write_atomic(path, lambda handle: save_image(pixels, handle, format="PNG"), durable=False)
        paths.append(path)
    return paths


def comparison_grid(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """Originals on the top row, reconstructions below (for W&B)."""
    both = torch.cat([originals.float().cpu(), recons.float().clamp(0, 1).cpu()])
    return make_grid(both, nrow=len(originals), padding=2)
