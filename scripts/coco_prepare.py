"""Cut COCO2017 photos into fixed-size lossless PNG crops for training and eval.

    python -m scripts.coco_prepare --coco_dir /data/coco --out_dir /data/coco224

Train crops are random but seeded per source image (so the output never depends
on how work is spread over processes); val crops are center crops. The same
inputs and seed give byte-identical files, a re-run skips crops already
written, and every file lands through a temp file + rename, so an interrupted
run never leaves a half-written PNG behind. ``manifest.json`` records the
arguments before the first crop is written, so a rerun that would make crops
another way is refused even after an interrupted first run.

Crop files are ``<stem>_NN.png``; sources of one split that share a stem
(``photo.jpg``, ``photo.png``, ``photo.JPG``) are named by their whole file
name instead (``photo.jpg_00.png``), so distinct sources never share a crop.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from src.checkpoint import write_atomic
from src.cli import UserError, run_cli, str2bool
from src.images import center_crop_box, fit_for_crop, list_images, load_rgb, random_crop_box, unusable_entries

SPLITS = {"train": "train2017", "val": "val2017"}
# zlib level 1: lossless like any level, 3x faster to encode than PIL's default 6,
# and photo crops come out only ~1% larger (measured on COCO-like 224 crops).
PNG_LEVEL = 1
# Training refuses crops that are not a multiple of the model's stride: bmshj2018-factorized's g_a halves 4 times.
CROP_MULTIPLE = 16


@dataclass(frozen=True)
class CropJob:
    """Everything one worker needs to turn one source photo into its crops."""

    source: Path
    stem: str  # what the crop names start with (see ``crop_stems``)
    split: str
    out_dir: Path
    crop_size: int
    crops_per_image: int
    seed: int
    upscale_small: bool

    def crop_paths(self) -> List[Path]:
        count = 1 if self.split == "val" else self.crops_per_image
        return [self.out_dir / self.split / f"{self.stem}_{k:02d}.png" for k in range(count)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write crop_size x crop_size PNG crops of COCO2017.")
    parser.add_argument("--coco_dir", required=True, help="COCO root holding train2017/ (and val2017/)")
    parser.add_argument("--out_dir", required=True, help="output root; crops go to OUT/train and OUT/val")
    parser.add_argument("--include_val", type=str2bool, default=True, help="also center-crop val2017 (true|false)")
    parser.add_argument("--crop_size", type=int, default=224)
    parser.add_argument("--crops_per_image", type=int, default=1, help="random crops per train image")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_images", type=int, default=0, help="first N images per split (0 = all)")
    parser.add_argument("--upscale_small", type=str2bool, default=False,
                        help="upscale images smaller than the crop instead of skipping them")
    return parser


def crop_boxes(job: CropJob, width: int, height: int) -> List[Tuple[int, int, int, int]]:
    """Center box for val; for train, boxes from an RNG seeded by (seed, file name) alone."""
    if job.split == "val":
        return [center_crop_box(width, height, job.crop_size)]
    rng = random.Random(f"{job.seed}:".encode() + os.fsencode(job.source.name))  # any file name, UTF-8 or not
    return [random_crop_box(width, height, job.crop_size, rng) for _ in range(job.crops_per_image)]


def process_image(job: CropJob) -> Tuple[str, str, List[str]]:
    """Returns (status, reason, crop names). status: written | existing | skipped."""
    paths = job.crop_paths()
    if all(p.exists() for p in paths):
        return "existing", "", [p.name for p in paths]
    try:
        img = load_rgb(job.source)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = "unreadable" if isinstance(err, UnidentifiedImageError) else "corrupt"
        if job.source.stat().st_size == 0:
            reason = "empty"
        return "skipped", reason, []
    if min(img.size) < job.crop_size:
        if not job.upscale_small:
            return "skipped", "too_small", []
        img = fit_for_crop(img, job.crop_size, job.crop_size)
    for path, box in zip(paths, crop_boxes(job, *img.size)):
        if not path.exists():
            crop = img.crop(box)
            write_atomic(path, lambda handle: crop.save(handle, format="PNG", compress_level=PNG_LEVEL), durable=False)
    return "written", "", [p.name for p in paths]


def crop_stems(sources: Sequence[Path]) -> Dict[Path, str]:
    """The crop name stem of each source: its own stem, or its whole name where stems collide.

    Stems are compared case-insensitively (``photo.jpg`` and ``Photo.png`` would
    meet on a case-insensitive disk); a whole name that meets another source's
    stem (``photo.jpg`` beside ``photo.jpg.png``) moves that one to its whole
    name too. Computed over the whole split, so ``--max_images`` never renames.
    """
    stems = {s: s.stem for s in sources}
    while True:
        seen = Counter(stem.casefold() for stem in stems.values())
        clash = [s for s, stem in stems.items() if seen[stem.casefold()] > 1 and stem != s.name]
        if not clash:
            return stems
        stems.update((s, s.name) for s in clash)


def collect_jobs(args: argparse.Namespace, coco_dir: Path, out_dir: Path) -> List[CropJob]:
    splits = ["train"] + (["val"] if args.include_val else [])
    jobs: List[CropJob] = []
    for split in splits:
        src_dir = coco_dir / SPLITS[split]
        if not src_dir.is_dir():
            raise UserError(f"{src_dir} not found: --coco_dir must hold {SPLITS[split]}/")
        sources = list_images(src_dir)
        stems = crop_stems(sources)
        if args.max_images > 0:
            sources = sources[: args.max_images]
        jobs += [CropJob(s, stems[s], split, out_dir, args.crop_size, args.crops_per_image, args.seed,
                         args.upscale_small) for s in sources]
    return jobs


def run_jobs(jobs: List[CropJob], workers: int) -> List[Tuple[str, str, List[str]]]:
    """Map ``process_image`` over a process pool; results come back in job order."""
    desc = "coco_prepare"
    if workers <= 1:
        return [process_image(j) for j in tqdm(jobs, desc=desc, unit="img")]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = max(1, min(64, len(jobs) // (workers * 8)))
        return list(tqdm(pool.map(process_image, jobs, chunksize=chunk), total=len(jobs), desc=desc, unit="img"))


def write_failed(path: Path, err: OSError) -> UserError:
    """One line for a write that failed: a full disk says how much is free, anything else its reason."""
    if err.errno == errno.ENOSPC:
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
        return UserError(f"could not write {path}: the disk is full ({free / 2**20:.1f} MiB free there); free space "
                         "and rerun with the same arguments to complete it (the crops written so far are kept)")
    return UserError(f"could not write {path} ({err.strerror or err}); crops written so far are kept")


def write_manifest(out_dir: Path, manifest: Dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    path = out_dir / "manifest.json"
    try:
        write_atomic(path, lambda handle: handle.write(text))
    except OSError as err:
        raise write_failed(path, err) from None


def shown(name: str) -> str:
    """A file name printable on any terminal: bytes that are not UTF-8 appear as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


# Arguments that decide which pixels a crop holds: an --out_dir is reused only with the same ones.
CROP_DEFINING_ARGS = ("crop_size", "crops_per_image", "seed", "upscale_small")


def holds_crops(out_dir: Path) -> bool:
    return any(next((out_dir / split).glob("*.png"), None) for split in SPLITS if (out_dir / split).is_dir())


def check_reuse(out_dir: Path, args: argparse.Namespace) -> bool:
    """Refuse to add crops made another way to an existing output (they would mix, or be skipped by name).

    The manifest holds the arguments from before the first crop on, so an
    interrupted run is covered; crops without a manifest were made some
    unknown way and are not added to either. True when the manifest already
    records these arguments (and is left as it is until the run ends).
    """
    manifest = out_dir / "manifest.json"
    start_over = f"use another --out_dir, or delete {out_dir} to start over"
    if not manifest.is_file():
        if holds_crops(out_dir):
            raise UserError(f"{out_dir} holds crops but no manifest.json saying how they were made; {start_over}")
        return False
    try:
        previous = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{manifest} is unreadable ({err}); remove it or use another --out_dir") from None
    saved = previous.get("args", {}) if isinstance(previous, dict) else {}
    changes = [f"--{k} {saved[k]} -> {getattr(args, k)}" for k in CROP_DEFINING_ARGS
               if k in saved and saved[k] != getattr(args, k)]
    if changes and holds_crops(out_dir):  # an output with no crop yet has nothing to mix with
        raise UserError(f"{out_dir} holds crops made with other arguments ({'; '.join(changes)}); "
                        f"rerun with the same arguments to complete it, {start_over}")
    return bool(saved) and not changes


def make_out_dir(out_dir: Path, splits: Sequence[str]) -> None:
    try:
        for split in splits:
            (out_dir / split).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out_dir {out_dir} cannot be created ({err.strerror or err})") from None


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    if args.crop_size < CROP_MULTIPLE or args.crop_size % CROP_MULTIPLE:
        near = max(1, round(args.crop_size / CROP_MULTIPLE)) * CROP_MULTIPLE
        raise UserError(f"--crop_size {args.crop_size} is not a multiple of {CROP_MULTIPLE}: training refuses crops "
                        f"its model's stride ({CROP_MULTIPLE}) does not divide; use e.g. {near}")
    if args.crops_per_image < 1:
        raise UserError("--crops_per_image must be >= 1")
    coco_dir, out_dir = Path(args.coco_dir), Path(args.out_dir)
    if not coco_dir.is_dir():
        raise UserError(f"--coco_dir {coco_dir} does not exist")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a folder")
    jobs = collect_jobs(args, coco_dir, out_dir)
    recorded = check_reuse(out_dir, args)
    make_out_dir(out_dir, sorted({job.split for job in jobs}))
    run_args = vars(args) | {"coco_dir": str(coco_dir), "out_dir": str(out_dir)}
    if not recorded:  # the parameters land before the first crop: an interrupted run still says how it cut
        write_manifest(out_dir, {"args": run_args, "counts": {}, "skipped": {}, "crops": {}, "complete": False})

    start = time.perf_counter()
    try:
        results = run_jobs(jobs, max(1, args.workers))
    except OSError as err:  # reading errors are skipped per file: this one is writing a crop
        raise write_failed(Path(err.filename) if err.filename else out_dir, err) from None
    seconds = time.perf_counter() - start

    counts: Counter = Counter()
    skipped: Dict[str, str] = {}
    mapping: Dict[str, List[str]] = {}
    for split in sorted({job.split for job in jobs}):
        for path, reason in unusable_entries(coco_dir / SPLITS[split]).items():
            counts[f"skipped_{reason}"] += 1
            skipped[f"{SPLITS[split]}/{path.name}"] = reason
    for job, (status, reason, names) in zip(jobs, results):
        src_key = f"{SPLITS[job.split]}/{job.source.name}"
        if status == "skipped":
            counts[f"skipped_{reason}"] += 1
            skipped[src_key] = reason
        else:
            counts[status] += 1
            counts[f"crops_{job.split}"] += len(names)
            mapping[src_key] = [f"{job.split}/{n}" for n in names]
    crops_made = sum(len(n) for (s, _, n) in results if s == "written")
    manifest = {
        "args": run_args,
        "counts": dict(counts),
        "skipped": skipped,
        "crops": mapping,
        "complete": True,
    }
    write_manifest(out_dir, manifest)

    summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    print(f"coco_prepare: {summary}; {crops_made} new crops in {seconds:.1f}s "
          f"({crops_made / max(seconds, 1e-9):.1f} crops/s, {args.workers} workers) -> {shown(str(out_dir))}")
    for src_key, reason in sorted(skipped.items()):
        print(f"  skipped {shown(src_key)}: {reason}")
    if counts["written"] + counts["existing"] == 0:
        raise UserError(f"no crops written: none of the {len(jobs)} source images was usable")
    return manifest


if __name__ == "__main__":
    run_cli(main)
