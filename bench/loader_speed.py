"""DataLoader throughput over prepared crops, per worker count, against what a training step needs.

    python -m bench.loader_speed --data bench_out/recovery/crops128 --batch_size 8

The loader must never be the bottleneck: compare its img/s with the training
step's img/s (bench.train_speed) and, for a GPU, with ~100x that.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from src.data import PreparedCrops
from src.distributed import DistInfo
from src.loaders import EpochLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared crops root (with train/)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    dataset = PreparedCrops(Path(args.data) / "train")
    print(f"{len(dataset)} crops of {dataset[0].shape[-1]}px, batch {args.batch_size}, best of {args.epochs} epochs")
    for workers in args.workers:
        loader = EpochLoader(dataset, args.batch_size, workers, 0, DistInfo(), pin_memory=False,
                             persistent_workers=workers > 0)
        best = 0.0
        for epoch in range(args.epochs + (1 if workers else 0)):  # first epoch with workers warms them up
            start = time.perf_counter()
            images = sum(len(batch) for batch in loader.epoch(epoch) if batch is not None)
            rate = images / (time.perf_counter() - start)
            if workers == 0 or epoch > 0:
                best = max(best, rate)
        print(f"workers={workers}: {best:8.1f} img/s" + (f" ({best / workers:.1f} per worker)" if workers else ""))


if __name__ == "__main__":
    main()
