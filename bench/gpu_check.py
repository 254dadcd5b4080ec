"""One GPU check of the recipe's GPU path: what it prints is what docs/benchmarks.md records.

    bash bench/gpu_check.sh                 # on a GPU box, under 8 minutes on one GPU
    bash bench/gpu_check.sh --cpu_smoke     # tiny sizes on the CPU: catches a broken script before GPU time

Sections, each timed:
1. the device, torch, CUDA, cuDNN, native bf16;
2. training img/s of the real training script (``src.train_finetune_relu``,
   GDN bmshj2018-factorized at q8, 224 px crops, batch 16, CompressAI's
   objective) for fp32, bf16 and fp16, each plain, ``--channels_last``,
   ``--compile`` and both; the second epoch's img/s (the first pays for
   compilation and cuDNN autotuning); and bf16 with the unfused Adam (a host
   sync every step) for what the sync-free step saves;
3. CompressAI's plain training step against the recipe's engine step, same
   batches (``bench.train_speed`` steps mode), for the ratio;
4. host syncs inside one training step (``torch.cuda.set_sync_debug_mode`` and
   tensor-to-host reads, ``aten._local_scalar_dense``), fused Adam against plain;
5. loader img/s with 4 and 8 workers at batch 16, uint8 items against float32;
6. torchrun: 2 processes with NCCL when 2 GPUs are present; on one GPU a
   one-rank NCCL all-reduce (NCCL takes one device per rank) and a 2-process
   gloo run of the training script (the launcher and the DDP path);
7. ``src.eval`` on CUDA (real bitstream, synchronised timings) and
   ``scripts.export_onnx`` of the trained checkpoint.

Data: scikit-image's sample photos, prepared into crops here (no network).
Targets to compare with: >= 2,000 img/s bf16 at q8 224 on an H100/H200-class
GPU, the loader above the training rate, at most one host sync per
``--log_every`` window.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
import warnings
from itertools import islice
from pathlib import Path
from typing import List, Optional

import torch

from src.cli import run_cli
from src.commands import CommandFailed, run
from src.train_args import zoo_objective


def section(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(start: float) -> None:
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def environment(device: torch.device) -> None:
    start = section("1. device and versions")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        print(f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}, "
              f"{torch.cuda.device_count()} GPU(s), native bf16: {'yes' if major >= 8 else 'no'}")
    else:
        print(f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    done(start)


def prepare_data(work: Path, crop: int, crops_per_image: int) -> Path:
    """COCO-like folders of scikit-image's photos, then ``scripts.coco_prepare`` crops."""
    from src.images import load_rgb
    from src.sample_photos import skimage_photos

    start = section(f"data: {crop}px crops of scikit-image's photos")
    coco = work / "coco"
    photos = skimage_photos()
    for split, chosen in (("train2017", photos[:-2]), ("val2017", photos[-2:])):
        (coco / split).mkdir(parents=True, exist_ok=True)
        for index, path in enumerate(chosen):
            load_rgb(path).save(coco / split / f"{index + 1:012d}.png")
    crops = work / f"crops{crop}"
    run([sys.executable, "-m", "scripts.coco_prepare", "--coco_dir", str(coco), "--out_dir", str(crops),
         "--crop_size", str(crop), "--crops_per_image", str(crops_per_image)], work / "prepare.log")
    print(f"{len(list((crops / 'train').iterdir()))} train crops, {len(list((crops / 'val').iterdir()))} val crops")
    done(start)
    return crops


def training_args(crops: Path, save: Path, quality: int, batch: int, steps: int, workers: int) -> List[str]:
    return ["--coco_dir", str(crops), "--quality", str(quality), "--pretrained", "false", "--replace_parts", "none",
            "--train_scope", "all", *zoo_objective(quality), "--epochs", "2", "--max_steps_per_epoch", str(steps), "--batch_size", str(batch),
            "--num_workers", str(workers), "--recon_count", "0", "--log_every", "50", "--save_dir", str(save),
            "--recon_dir", str(save / "recon"), "--overwrite", "true"]


def train_img_per_s(flags: List[str], name: str, crops: Path, work: Path, args: argparse.Namespace,
                    device: torch.device) -> str:
    """The training script's img/s of its last epoch with ``flags``, as a table cell ("failed: ..." if it fails)."""
    save = work / "train" / name
    cmd = [sys.executable, "-m", "src.train_finetune_relu", "--device", device.type, *flags,
           *training_args(crops, save, args.quality, args.batch, args.steps, args.workers)]
    try:
        out = run(cmd, work / f"train_{name}.log", timeout=240)
    except CommandFailed as err:
        return "failed: " + str(err)[:14]
    rates = re.findall(r"\| ([\d.]+) img/s", out)
    return f"{float(rates[-1]):.0f} img/s" if rates else "no epoch line"


def training_matrix(crops: Path, work: Path, args: argparse.Namespace, device: torch.device) -> Path:
    """The dtype x speed-flag table; returns the fp32 plain run's checkpoint (section 7 evaluates it)."""
    start = section(f"2. training img/s, real script: q{args.quality}, {args.crop}px, batch {args.batch}, "
                    f"{args.steps} steps/epoch, epoch 2")
    dtypes = ["fp32", "bf16", "fp16"]
    variants = [("plain", []), ("channels_last", ["--channels_last", "true"]), ("compile", ["--compile", "true"]),
                ("channels_last+compile", ["--channels_last", "true", "--compile", "true"])]
    if args.cpu_smoke:  # compiling takes a minute on a CPU; the flag is tested in tests/test_speed.py
        variants = variants[:2]
    print(f"{'precision':<10}" + "".join(f"{name:>24}" for name, _ in variants))
    for dtype in dtypes:
        amp = ["--amp", "false"] if dtype == "fp32" else ["--amp", "true", "--amp_dtype", dtype]
        cells = [train_img_per_s([*amp, *flags], f"{dtype}_{name}", crops, work, args, device)
                 for name, flags in variants]
        print(f"{dtype:<10}" + "".join(f"{cell:>24}" for cell in cells), flush=True)
    # What the sync-free step saves: bf16 plain with the unfused Adam, whose skip verdict is read every step.
    cell = train_img_per_s(["--amp", "true", "--amp_dtype", "bf16", "--fused_optimizer", "false"],
                           "bf16_plain_unfused", crops, work, args, device)
    print(f"bf16 plain with --fused_optimizer false (a host sync every step): {cell}", flush=True)
    done(start)
    return work / "train" / "fp32_plain" / "last.pt"


def plain_loop_ratio(work: Path, args: argparse.Namespace, device: torch.device) -> None:
    start = section("3. CompressAI's plain step against the recipe's engine step (bench.train_speed, same batches)")
    scale = "smoke" if args.cpu_smoke else "full"
    out = run([sys.executable, "-m", "bench.train_speed", "--scale", scale, "--quality", str(args.quality),
               "--device", device.type, "--rounds", "2", "--steps", "4" if args.cpu_smoke else "30"],
              work / "train_speed.log", timeout=300)
    print("\n".join(line for line in out.splitlines() if line.strip()))
    done(start)


def host_syncs(crops: Path, work: Path, args: argparse.Namespace, device: torch.device) -> None:
    """Syncs inside the engine's training_step, for fused and plain Adam (bf16 on CUDA, fp32 on the CPU).

    The run is built as the training script builds it (``src.engine.setup.build_run``: its model, loader and
    Trainer), and its steps are called here one by one, each inside the counters.
    """
    from src.data import to_unit_float
    from src.distributed import DistInfo
    from src.engine import setup, training_step
    from src.speed import HostReads
    from src.train_args import get_args_parser, validate_args

    start = section("4. host syncs inside one training step")
    for fused in ("true", "false"):
        amp = ["--amp", "true", "--amp_dtype", "bf16"] if device.type == "cuda" else ["--amp", "false"]
        flags = get_args_parser("host syncs").parse_args(["--device", device.type, "--fused_optimizer", fused, *amp,
                                                          *training_args(crops, work / f"syncs_{fused}", args.quality,
                                                                         args.batch, min(args.steps, 10), 0)])
        validate_args(flags)
        counts = []
        log = work / f"syncs_fused_{fused}.log"
        with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            built = setup.build_run(flags, "none", None, None, device, DistInfo())
            built.tr.model.train()
            for x in islice(built.train_loader.epoch(0), built.loop.steps):
                x = to_unit_float(x, device, built.tr.memory_format)
                # Reads of tensors on the training device only: a CPU scalar read on a GPU box syncs nothing.
                with warnings.catch_warnings(record=True) as caught, HostReads(device.type) as reads:
                    warnings.simplefilter("always")
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        training_step(built.tr, x, built.state)
                    finally:
                        if device.type == "cuda":
                            torch.cuda.set_sync_debug_mode("default")
                counts.append((reads.reads, sum("synchronizing" in str(w.message) for w in caught)))
                built.state.steps_run += 1
        steady = counts[2:] or counts
        print(f"fused Adam {fused:<5}: per step {sum(c[0] for c in steady) / len(steady):.1f} tensor->host reads, "
              f"{sum(c[1] for c in steady) / len(steady):.1f} CUDA sync warnings (steps 3..{len(counts)}; "
              "plus one read-back per --log_every window)", flush=True)
    done(start)


def loader(crops: Path, args: argparse.Namespace, device: torch.device) -> None:
    from bench.loader_speed import Float32Items, images_per_second
    from src.data import PreparedCrops

    start = section(f"5. loader img/s, batch {args.batch}")
    dataset = PreparedCrops(crops / "train")
    for workers in ((1,) if args.cpu_smoke else (4, 8)):
        rates = {name: images_per_second(ds, args.batch, workers, 2, device, device.type == "cuda")
                 for name, ds in (("uint8", dataset), ("float32", Float32Items(dataset)))}
        print(f"workers={workers}: uint8 {rates['uint8']:.0f} img/s ({rates['uint8'] / workers:.0f} per worker), "
              f"float32 items {rates['float32']:.0f} img/s", flush=True)
    done(start)


def distributed(crops: Path, work: Path, args: argparse.Namespace, device: torch.device) -> None:
    start = section("6. torchrun")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus == 1:
        code = ("import torch, torch.distributed as d; d.init_process_group('nccl', init_method='tcp://127.0.0.1:29533',"
                " rank=0, world_size=1); t = torch.ones(4, device='cuda'); d.all_reduce(t); torch.cuda.synchronize();"
                " print('NCCL', torch.cuda.nccl.version(), 'one-rank all_reduce ok', t.tolist()); d.destroy_process_group()")
        print(run([sys.executable, "-c", code], work / "nccl.log", timeout=120).strip())
    procs, run_device = (2, "cuda") if gpus >= 2 else (2, "cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_port", "29531",
           "-m", "src.train_finetune_relu", "--device", run_device, "--amp", "false",
           *training_args(crops, work / "ddp", 1, 2, 3, 0)]
    out = run(cmd, work / "torchrun.log", timeout=300)
    same = "same on all" in out
    print(f"{procs} processes on {run_device} ({'NCCL' if run_device == 'cuda' else 'gloo'}): "
          f"{'finished, weights identical on all ranks' if same else 'finished, ranks NOT identical'}")
    done(start)


def eval_and_export(checkpoint: Path, crops: Path, work: Path, device: torch.device) -> None:
    start = section(f"7. eval on {device.type} and ONNX export of {checkpoint}")
    out = run([sys.executable, "-m", "src.eval", "--device", device.type, "--checkpoint", str(checkpoint),
               "--coco_dir", str(crops), "--max_images", "4"], work / "eval.log")
    print("\n".join(line for line in out.splitlines() if line.strip() and "it/s" not in line))
    image = str(sorted((crops / "val").iterdir())[0])
    out = run([sys.executable, "-m", "scripts.export_onnx", "--ckpt", str(checkpoint), "--part", "encoder",
               "--out", str(work / "encoder.onnx"), "--input_size", "64", "--image", image], work / "export.log")
    print("\n".join(line for line in out.splitlines() if "onnxruntime vs" in line or line.startswith("exported")))
    done(start)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu_smoke", action="store_true", help="tiny sizes on the CPU, a check of the script")
    parser.add_argument("--work_dir", default=os.environ.get("OUT", "bench_out/gpu_check"))
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.quality, args.crop, args.batch = (1, 64, 2) if smoke else (8, 224, 16)
    args.steps, args.workers = (3, 0) if smoke else (150, 8)
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu_smoke to check the script on the CPU")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    environment(device)
    crops = prepare_data(work, args.crop, 4 if smoke else 32)
    checkpoint = training_matrix(crops, work, args, device)
    plain_loop_ratio(work, args, device)
    host_syncs(crops, work, args, device)
    loader(crops, args, device)
    distributed(crops, work, args, device)
    eval_and_export(checkpoint, crops, work, device)
    print(f"\ngpu_check: {time.perf_counter() - begin:.0f} s in all")


if __name__ == "__main__":
    run_cli(main)
