"""DataLoader throughput over prepared crops, per worker count: uint8 items (now) against float32 items (before).

    python -m bench.loader_speed --data bench_out/crops224x8 --batch_size 16 --workers 0 1 2

Workers now ship uint8 crops and the batch becomes float on the device
(``src.data.to_unit_float``, timed here on this machine's device); before,
each worker converted its crops to float32 and shipped 4x the bytes. The
loader must never be the bottleneck: compare its img/s with the training
step's img/s (bench.train_speed) and, for a GPU, with what the GPU trains.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from src.codec.roundtrip import synchronize
from src.data import EpochLoader, PreparedCrops, to_unit_float
from src.distributed import DistInfo


class Float32Items(Dataset):
    """The loader as it was: each worker converts its crop to float32 in [0, 1]."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        return None if item is None else item.float().div_(255.0)


def images_per_second(dataset: Dataset, batch_size: int, workers: int, epochs: int, device: torch.device,
                      pin_memory: bool) -> float:
    """Best img/s over ``epochs`` (after one warm-up epoch with workers), float batches on ``device`` included."""
    loader = EpochLoader(dataset, batch_size, workers, 0, DistInfo(), pin_memory=pin_memory,
                         persistent_workers=workers > 0)
    best = 0.0
    for epoch in range(epochs + (1 if workers else 0)):
        start = time.perf_counter()
        images = 0
        for batch in loader.epoch(epoch):
            if batch is None:
                continue
            x = to_unit_float(batch, device) if batch.dtype == torch.uint8 else batch.to(device, non_blocking=True)
            images += len(x)
        synchronize(device)
        rate = images / (time.perf_counter() - start)
        if workers == 0 or epoch > 0:
            best = max(best, rate)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared crops root (with train/)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dataset = PreparedCrops(Path(args.data) / "train")
    print(f"{len(dataset)} crops of {dataset[0].shape[-1]}px, batch {args.batch_size}, best of {args.epochs} epochs, "
          f"float batches on {device}")
    for workers in args.workers:
        rates = {name: images_per_second(ds, args.batch_size, workers, args.epochs, device, device.type == "cuda")
                 for name, ds in (("uint8", dataset), ("float32", Float32Items(dataset)))}
        per = f" ({rates['uint8'] / workers:.1f} per worker)" if workers else ""
        print(f"workers={workers}: uint8 items {rates['uint8']:8.1f} img/s{per} | float32 items (before) "
              f"{rates['float32']:8.1f} img/s | x{rates['uint8'] / rates['float32']:.2f}", flush=True)


if __name__ == "__main__":
    main()
