"""coco_prepare throughput against the decode-only limit, same files, same worker count.

    python -m bench.prepare_speed --coco_dir ../shared/data/minicoco --workers 2

Decoding the JPEG is the floor of what preparation can cost; the ratio shows
how much the crop + PNG encode + atomic write add on top.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from scripts import coco_prepare
from src.images import list_images, load_rgb


def decode_only(path: Path) -> int:
    return load_rgb(path).size[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco_dir", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    coco = Path(args.coco_dir)
    files = list_images(coco / "train2017") + list_images(coco / "val2017")
    best_decode, best_prepare = float("inf"), float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(decode_only, files, chunksize=4))
        best_decode = min(best_decode, time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            manifest = coco_prepare.main(["--coco_dir", str(coco), "--out_dir", out, "--workers", str(args.workers)])
            best_prepare = min(best_prepare, time.perf_counter() - start)
    crops = manifest["counts"].get("crops_train", 0) + manifest["counts"].get("crops_val", 0)
    print(f"{len(files)} JPEGs, {args.workers} workers, best of {args.repeat}")
    print(f"decode only : {len(files) / best_decode:8.1f} img/s")
    print(f"coco_prepare: {crops / best_prepare:8.1f} crops/s ({len(files) / best_prepare:.1f} source img/s, "
          f"{best_prepare / best_decode:.2f}x the decode-only time)")


if __name__ == "__main__":
    main()
