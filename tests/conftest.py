"""Shared test data: real photographs shipped with scikit-image, laid out like COCO.

Tests never touch the network or files outside the repository; everything is
built in pytest's tmp dirs from these package-shipped photos.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from scripts import coco_prepare
from src.cli import run_cli
from src.images import load_rgb
from src.sample_photos import COLOR_PHOTOS, skimage_photos

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- training runs in tests

def common_args(data, tmp_path, *extra):
    """A training run small enough for a test: q=1, random init, 2 epochs of 2 steps of 2 crops, 2 recon PNGs."""
    return ["--coco_dir", str(data), "--quality", "1", "--pretrained", "false", "--epochs", "2",
            "--max_steps_per_epoch", "2", "--batch_size", "2", "--num_workers", "0",
            "--save_dir", str(tmp_path / "ckpt"), "--recon_dir", str(tmp_path / "recon"),
            "--recon_count", "2", "--log_every", "1", *extra]


def with_flags(argv, flags, names):
    """``argv`` with each (flag, value) pair of ``flags`` set: replaced where present, else appended.

    Values are format strings over ``names`` (a bad-input table's files).
    """
    argv = list(argv)
    for flag, value in zip(flags[::2], flags[1::2]):
        value = value.format(**names)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def torchrun(entry, argv, port, **kwargs):
    """``entry`` (a module, or a script path ending in .py) under torchrun with 2 CPU processes."""
    target = [entry] if entry.endswith(".py") else ["-m", entry]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(port), *target, *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                          **kwargs)


def final_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


EXACT = ("--sched", "none", "--lr_warmup_steps", "3", "--train_scope", "all", "--max_steps_per_epoch", "3")


def one_line_error(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


# ---------------------------------------------------------------- the QAT phase

def qat_flags(coco_root, *extra):
    return ("--qat", "true", "--qat_calib_dir", str(coco_root / "train2017"), "--qat_calib_count", "2",
            "--amp", "false", "--train_scope", "all", "--sched", "none", "--max_steps_per_epoch", "3", *extra)


@pytest.fixture(scope="module")
def float_run(prepared64, tmp_path_factory):
    """A float NPU-all run's last.pt: the start of the QAT phase tests (tests/test_qat.py, tests/test_codec.py)."""
    import train_finetune_npu
    root = tmp_path_factory.mktemp("float")
    train_finetune_npu.main(common_args(prepared64, root, "--train_scope", "all", "--amp", "false"))
    return root / "ckpt" / "last.pt"


@pytest.fixture(scope="module")
def qat_run(float_run, prepared64, coco_root, tmp_path_factory):
    """(checkpoint, console log) of a 3-step QAT phase from ``float_run`` (whole calibration photos)."""
    import train_finetune_npu
    root = tmp_path_factory.mktemp("qat")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        train_finetune_npu.main(common_args(prepared64, root, *qat_flags(coco_root, "--base_checkpoint",
                                                                         str(float_run))))
    return root / "ckpt" / "last.pt", log.getvalue()


# ---------------------------------------------------------------- the codec

def tiny_checkpoint(path: Path, seed: int) -> Path:
    """A q1 NPU-all checkpoint of random weights with its entropy tables built (the codec tests' model)."""
    from src.checkpoint import save_checkpoint
    from src.model_factory import build_model, make_arch

    torch.manual_seed(seed)
    arch = make_arch(quality=1, replace="npu", replace_parts="all")
    model = build_model(arch)
    model.update(force=True)
    save_checkpoint({"state_dict": model.state_dict(), "arch": arch}, path)
    return path


@pytest.fixture(scope="session")
def codec_files(tmp_path_factory):
    """A q1 NPU-all checkpoint, photos of odd sizes (a.png 150x110, b.png 90x130, calib/), and its FP32 bundle.

    Shared by tests/test_codec.py and tests/test_codec_faults.py, which run.sh runs in one process of their own.
    """
    from scripts import export_onnx
    from src import eval as recipe_eval

    root = tmp_path_factory.mktemp("codec")
    photos = photo_paths()
    (root / "calib").mkdir()
    load_rgb(photos[0]).resize((150, 110)).save(root / "a.png")
    load_rgb(photos[1]).resize((90, 130)).save(root / "b.png")
    for index, path in enumerate(photos[2:7]):
        img = load_rgb(path)
        img.thumbnail((96, 96))
        img.save(root / "calib" / f"{index}.png")
    ckpt = tiny_checkpoint(root / "model.pt", seed=0)
    report = export_onnx.main(["--ckpt", str(ckpt), "--input_size", "64", "--bundle", str(root / "fp32"),
                               "--image", str(root / "a.png")])
    model, _, _ = recipe_eval.load_model(ckpt, torch.device("cpu"))
    return {"root": root, "ckpt": ckpt, "bundle": root / "fp32", "report": report, "model": model}
