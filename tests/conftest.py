"""Shared test data: real photographs shipped with scikit-image, laid out like COCO.

Tests never touch the network or files outside the repository; everything is
built in pytest's tmp dirs from these package-shipped photos.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from PIL import Image

from scripts import coco_prepare
from src.cli import run_cli
from src.images import load_rgb
from src.sample_photos import COLOR_PHOTOS, skimage_photos

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def share_cores_between_workers() -> None:
    """Under pytest-xdist (``./run.sh test`` runs ``-n``), each worker takes its share of the cores for torch's
    intra-op pool, and so do the processes it starts (``OMP_NUM_THREADS``): two workers with a pool of all cores
    each would oversubscribe the CPU, and most test tensors are too small to gain from more than one thread."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


share_cores_between_workers()

REPO = Path(__file__).resolve().parents[1]


def pytest_runtest_setup(item):
    item.openvino_loaded_before = "openvino" in sys.modules  # before any fixture of the test, session ones too


def pytest_runtest_teardown(item):
    """A test that loads OpenVINO (its fixtures included) must be marked ``own_process``: run.sh runs those in a
    pytest call of their own, because a forked child exiting after OpenVINO ran crashed the worker (see run.sh).
    An unmarked test that loads it errors here, instead of a later, innocent test's worker dying."""
    if not item.openvino_loaded_before and "openvino" in sys.modules and "own_process" not in item.keywords:
        pytest.fail(f"{item.nodeid} loaded OpenVINO (a codec bundle's verification does): mark it own_process")


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


def session_root(tmp_path_factory) -> Path:
    """The folder every pytest-xdist worker of this session sees (pytest's own tmp root of the session), so that
    what one worker built the others take instead of building it again; without xdist, the session's tmp root."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run by the first worker that asks for ``name``; the others wait on its lock and take the
    folder. A build that failed leaves no ``.done`` marker, so the next asker builds it again from empty."""
    folder = session_root(tmp_path_factory) / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".done").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "coco", write_coco)


@pytest.fixture(scope="session")
def prepared64(tmp_path_factory, coco_root) -> Path:
    """64x64 crops (4 per train photo, 1 per val photo) of the real photos."""
    return built_once(tmp_path_factory, "coco64", lambda out: coco_prepare.main(
        ["--coco_dir", str(coco_root), "--out_dir", str(out), "--crop_size", "64", "--crops_per_image", "4",
         "--workers", "1"]))


# ---------------------------------------------------------------- training runs in tests

def common_args(data, tmp_path, *extra):
    """A training run small enough for a test: q=1, random init, 2 epochs of 2 steps of 2 crops, FP32, no recon.

    A test that reads the recon folder asks for it with ``*RECON``; one about mixed precision with ``*AMP``.
    """
    return ["--coco_dir", str(data), "--quality", "1", "--pretrained", "false", "--epochs", "2",
            "--max_steps_per_epoch", "2", "--batch_size", "2", "--num_workers", "0",
            "--save_dir", str(tmp_path / "ckpt"), "--recon_dir", str(tmp_path / "recon"),
            "--recon_count", "0", "--log_every", "1", "--amp", "false", *extra]


RECON = ("--recon_count", "2")  # the first 2 val crops and their reconstructions, each epoch, and the sheet
# The recipe's default, bf16 autocast on the CPU: on a CPU without native bf16 (AVX2) a step costs ~3.5x the CPU time
# of FP32 (measured here: 8.2 s against 2.3 s for 3 steps of q1 at 64 px), so only the tests about it pay for it.
AMP = ("--amp", "true")


class FinishedRuns:
    """Training runs finished once per session, keyed by (script, data, flags), and shared by the session's
    pytest-xdist workers (``built_once``).

    Many tests need *a* finished run to refuse, resume, evaluate or break; they share one instead of training
    their own. ``get`` gives the run's folder (``ckpt/``, ``recon/``), which nobody may change; a test that
    changes the run (resumes it, adds files, trains into it) takes a ``copy`` in its own tmp_path.
    """

    def __init__(self, tmp_path_factory, data: Path):
        self.tmp_path_factory, self.data = tmp_path_factory, data

    def get(self, *flags: str, script: str = "relu", data: Path = None) -> Path:
        key = repr((script, str(data or self.data), flags))
        name = "run-" + hashlib.sha1(key.encode()).hexdigest()[:16]
        return built_once(self.tmp_path_factory, name, lambda folder: self._train(folder, script, data, flags))

    def _train(self, folder: Path, script: str, data: Path, flags) -> None:
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            train_main(script)(common_args(data or self.data, folder, *flags))
        (folder / "console.log").write_text(log.getvalue())

    def log(self, *flags: str, script: str = "relu", data: Path = None) -> str:
        """What the run printed (stdout and stderr)."""
        return (self.get(*flags, script=script, data=data) / "console.log").read_text()

    def copy(self, dest: Path, *flags: str, script: str = "relu", data: Path = None) -> Path:
        """The run's ``ckpt/`` and ``recon/`` copied into ``dest``, where ``common_args(data, dest)`` finds them."""
        shutil.copytree(self.get(*flags, script=script, data=data), dest, dirs_exist_ok=True)
        return dest


def train_main(script: str):
    """``main(argv)`` of a training script: ``relu`` (src/train_finetune_relu.py), ``npu`` (train_finetune_npu.py)."""
    if script == "npu":
        import train_finetune_npu
        return train_finetune_npu.main
    from src import train_finetune_relu
    return train_finetune_relu.main


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory, prepared64) -> FinishedRuns:
    return FinishedRuns(tmp_path_factory, prepared64)


ONE_EPOCH = ("--epochs", "1")  # the finished run most tests share: 1 epoch of 2 steps, ReLU encoder
GDN_CONTROL = ("--replace_parts", "none", "--train_scope", "all", *ONE_EPOCH)  # CompressAI's own model, fine-tuned


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
            "--train_scope", "all", "--sched", "none", "--max_steps_per_epoch", "3", *extra)


FLOAT_NPU = ("--train_scope", "all")


@pytest.fixture(scope="session")
def float_run(finished_runs):
    """A float NPU-all run's last.pt: the start of the QAT phase tests (tests/test_qat.py, tests/test_codec.py)."""
    return finished_runs.get(*FLOAT_NPU, script="npu") / "ckpt" / "last.pt"


@pytest.fixture(scope="session")
def qat_run(float_run, finished_runs, coco_root):
    """(checkpoint, console log) of a 3-step QAT phase from ``float_run`` (whole calibration photos)."""
    flags = qat_flags(coco_root, "--base_checkpoint", str(float_run))
    return finished_runs.get(*flags, script="npu") / "ckpt" / "last.pt", finished_runs.log(*flags, script="npu")


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
    import json

    from scripts import export_onnx
    from src import eval as recipe_eval

    def build(root: Path) -> None:
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
        (root / "report.json").write_text(json.dumps(report))

    root = built_once(tmp_path_factory, "codec", build)
    model, _, _ = recipe_eval.load_model(root / "model.pt", torch.device("cpu"))
    return {"root": root, "ckpt": root / "model.pt", "bundle": root / "fp32",
            "report": json.loads((root / "report.json").read_text()), "model": model}
