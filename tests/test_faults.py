"""Nothing lost, nothing hung, nothing silently wrong: the faults of issue 23 (training side)."""

import errno
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_finetune_npu
from src import engine, train_finetune_relu
from src.checkpoint import RunLock, save_checkpoint
from src.cli import UserError, run_cli
from src.codec.latents import LATENT_LIMIT, check_codable
from src.data import EpochLoader, PreparedCrops
from src.distributed import DistInfo
from src.model_factory import build_model, make_arch
from src.train_args import get_args_parser, resume_flag_changes
from tests.conftest import AMP, ONE_EPOCH, RECON, common_args, one_line_error, with_flags

REPO = Path(__file__).resolve().parents[1]


def finite_weights(path):
    return all(torch.isfinite(v).all() for v in torch.load(path, weights_only=True)["state_dict"].values()
               if v.is_floating_point())


# ---------------------------------------------------------------- latents the range coder cannot take

@pytest.mark.quick
@pytest.mark.parametrize("latent, needle", [
    (torch.tensor([0.5, float("nan"), float("inf")]), "2 of 3 latent values are NaN/Inf"),
    (np.array([1.0, -float(LATENT_LIMIT)]), "latent values reach"),
    (torch.tensor([-2 ** 31], dtype=torch.int32), r"latent values reach 2\.15e\+09"),  # what int() makes of NaN
])
def test_check_codable_refuses_nonfinite_and_absurd_latents(latent, needle):
    with pytest.raises(UserError, match=needle) as info:
        check_codable(latent, "ckpt.pt on kodim01.png")
    assert str(info.value).startswith("ckpt.pt on kodim01.png: ") and "\n" not in str(info.value)


@pytest.mark.quick
def test_check_codable_passes_sane_latents():
    check_codable(torch.randn(1, 192, 4, 4) * 300, "a model")
    check_codable(np.full((2, 3), LATENT_LIMIT - 1.0), "a model")


@pytest.fixture(scope="module")
def diverged_checkpoints(tmp_path_factory):
    """A NaN model and one with finite but absurd latents (g_a's last convolution scaled by 1e9)."""
    root = tmp_path_factory.mktemp("diverged")
    arch = make_arch(quality=1, replace="relu", replace_parts="encoder")
    paths = {}
    for name, scale in (("nan", float("nan")), ("huge", 1e9)):
        model = build_model(arch)
        with torch.no_grad():
            model.g_a[-1].weight.mul_(scale)
        model.update(force=True)
        paths[name] = root / f"{name}.pt"
        save_checkpoint({"state_dict": model.state_dict(), "arch": arch}, paths[name])
    return paths


def test_eval_refuses_a_diverged_checkpoint_instead_of_hanging(diverged_checkpoints, prepared64, capsys):
    """Before the fix CompressAI's range coder never returned on these. The absurd one runs as the user runs it
    (src.eval's subprocess smoke test: a hang times out); the NaN one through the same entry function."""
    from src import eval as recipe_eval

    argv = ["--image_dir", str(prepared64 / "val"), "--max_images", "1", "--checkpoint"]
    result = subprocess.run([sys.executable, "-m", "src.eval", *argv, str(diverged_checkpoints["huge"])],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    err = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert err.startswith(f"error: {diverged_checkpoints['huge']} on ") and "latent values reach" in err
    with pytest.raises(SystemExit) as exit_info:  # stderr: the progress bar, then one line
        run_cli(recipe_eval.main, [*argv, str(diverged_checkpoints["nan"])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
    err = err.strip().splitlines()[-1]
    assert err.startswith(f"error: {diverged_checkpoints['nan']} on ") and "latent values are NaN/Inf" in err


def test_demo_sheet_refuses_a_diverged_stage(diverged_checkpoints, prepared64, tmp_path):
    from scripts.demo import decode_stages

    photo = sorted((prepared64 / "val").glob("*.png"))[0]
    with pytest.raises(UserError, match=f"{diverged_checkpoints['huge']} on {photo.name}: latent values reach"):
        decode_stages({"huge": diverged_checkpoints["huge"]}, photo, tmp_path / "sheet", bpp={"huge": 1.0})


# ---------------------------------------------------------------- diverged training stops, keeps the last good last.pt

def test_training_never_saves_a_model_with_absurd_latents(diverged_checkpoints, prepared64, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_finetune_relu.main, common_args(prepared64, tmp_path, "--base_checkpoint",
                                                      str(diverged_checkpoints["huge"]), "--epochs", "1",
                                                      "--max_steps_per_epoch", "1", "--max_grad_norm", "1e-9"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 3 and "diverged after epoch 1 and is not saved" in err, err
    assert f"nothing was saved in {tmp_path / 'ckpt'}" in err
    assert not (tmp_path / "ckpt" / "last.pt").exists()


def test_nan_weights_stop_the_run_and_keep_the_last_good_checkpoint(prepared64, tmp_path, capsys, monkeypatch):
    """An optimizer step that leaves NaN weights (finite loss and gradients) in epoch 2: last.pt stays epoch 1's."""
    step = engine.step.step_optimizers
    calls = {"n": 0}

    def step_then_poison(tr, skip=None):
        step(tr, skip)
        calls["n"] += 1
        if calls["n"] == 3:  # the first step of epoch 2
            with torch.no_grad():
                engine.unwrap(tr.model).g_a[0].weight.fill_(float("nan"))

    monkeypatch.setattr(engine.step, "step_optimizers", step_then_poison)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_finetune_relu.main, common_args(prepared64, tmp_path, "--epochs", "3", *RECON))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 3
    assert "diverged after epoch 2 and is not saved" in err and "(epoch 1) is kept" in err, err
    assert "done:" not in out and "epoch 2/3" in out
    last = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and finite_weights(tmp_path / "ckpt" / "last.pt")
    assert not (tmp_path / "recon" / "epoch_002").exists() and not (tmp_path / "recon" / "report.png").exists()


def test_diverging_lr_exits_non_zero_and_saves_nothing_non_finite(prepared64, tmp_path, capsys):
    """The issue's ``--lr 10 --epochs 3``: exit 0 with a NaN val loss before."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_finetune_relu.main, common_args(prepared64, tmp_path, "--lr", "10", "--epochs", "3",
                                                      "--train_scope", "all"))
    assert exit_info.value.code == 3, capsys.readouterr()
    assert "RD 0.0000" not in capsys.readouterr().out
    for name in ("last.pt", "best_loss.pt", "best_msssim.pt"):
        if (tmp_path / "ckpt" / name).exists():
            assert finite_weights(tmp_path / "ckpt" / name), name


def test_an_epoch_with_every_step_skipped_says_so(prepared64, tmp_path, capsys, monkeypatch):
    prepare = engine.setup.prepare_model

    def prepare_with_inf_gradients(*args, **kwargs):
        model = prepare(*args, **kwargs)
        engine.unwrap(model).g_a[0].weight.register_hook(lambda grad: grad * float("inf"))
        return model

    monkeypatch.setattr(engine.setup, "prepare_model", prepare_with_inf_gradients)
    summary = train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1"))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1"))
    assert "every train step of this epoch was skipped" in line and "RD 0.0000" not in line, line
    assert summary["nonfinite_steps"] == 2 and summary["epochs"][0]["train"] == {}


# ---------------------------------------------------------------- resume after a signal, with workers

@pytest.mark.quick
def test_resumed_epoch_skips_its_done_batches_with_workers(prepared64):
    """A DataLoader with workers calls iter() on its batch sampler twice: the skip must hold for the second."""
    dataset = PreparedCrops(prepared64 / "train")
    loader = EpochLoader(dataset, 2, 2, seed=0, dist=DistInfo(), pin_memory=False, persistent_workers=False)
    whole = [batch for batch in loader.epoch(1)]
    resumed = [batch for batch in loader.epoch(1, skip_batches=3)]
    assert len(resumed) == len(whole) - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[3:]))


# ---------------------------------------------------------------- output folders: one run each

def test_fresh_run_refuses_a_folder_holding_another_run(finished_runs, prepared64, tmp_path, capsys):
    finished_runs.copy(tmp_path, *ONE_EPOCH, *RECON)
    before = (tmp_path / "ckpt" / "last.pt").read_bytes()
    err = one_line_error(train_finetune_relu.main, common_args(prepared64, tmp_path, *ONE_EPOCH, *RECON), capsys)
    assert "hold another run" in err and "--overwrite true" in err and "--resume" in err
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == before
    err = one_line_error(train_finetune_relu.main, common_args(prepared64, tmp_path / "other", *ONE_EPOCH, *RECON,
                                                               "--recon_dir", str(tmp_path / "recon")), capsys)
    assert "hold another run" in err and str(tmp_path / "recon" / "epoch_001") in err


def test_overwrite_replaces_the_earlier_run_entirely(finished_runs, coco_root, tmp_path, capsys):
    finished_runs.copy(tmp_path, "--epochs", "2", "--max_steps_per_epoch", "1", *RECON)
    old_origin = (tmp_path / "recon" / "origin" / "00000.png").read_bytes()
    train_finetune_relu.main(common_args(coco_root, tmp_path, "--epochs", "1", "--max_steps_per_epoch", "1",
                                         "--use_prepared", "false", "--crop_size", "80", "--overwrite", "true",
                                         *RECON))
    assert "--overwrite true: removed the earlier run's" in capsys.readouterr().out
    # the earlier run's epoch_002 and its rate record epoch_002.json are gone; the new run's epoch_001 is its own
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == ["epoch_001", "epoch_001.json", "origin",
                                                                      "report.png"]
    assert (tmp_path / "recon" / "origin" / "00000.png").read_bytes() != old_origin
    assert Image.open(tmp_path / "recon" / "origin" / "00000.png").size == (80, 80)
    assert torch.load(tmp_path / "ckpt" / "best_loss.pt", weights_only=True)["args"]["crop_size"] == 80


def test_resume_refuses_a_recon_dir_holding_other_originals(finished_runs, prepared64, tmp_path, capsys):
    finished_runs.copy(tmp_path, *ONE_EPOCH, *RECON)
    origin = tmp_path / "recon" / "origin"
    shutil.copy(origin / "00001.png", origin / "00000.png")
    err = one_line_error(train_finetune_relu.main, common_args(
        prepared64, tmp_path, *ONE_EPOCH, *RECON, "--resume", str(tmp_path / "ckpt" / "last.pt"),
        "--extend_epochs", "1"),
        capsys)
    assert f"{origin / '00000.png'} is not this run's val crop 0" in err


def test_a_second_run_at_the_same_time_is_refused_and_a_dead_ones_lock_taken_over(prepared64, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    lock = tmp_path / "ckpt" / RunLock.NAME
    with open(lock, "w") as held:  # another live run: it holds the flock
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        err = one_line_error(train_finetune_relu.main, common_args(prepared64, tmp_path, "--epochs", "1"), capsys)
    assert "is in use by another training run (pid 4242 on elsewhere" in err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"pid {dead.pid} on here\n")  # a run killed with -9: its lock file stays, its flock is gone
    train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1", *RECON))
    assert not lock.exists() and not (tmp_path / "recon" / RunLock.NAME).exists(), "released on exit"


def test_orphan_temp_files_of_killed_writers_are_removed(prepared64, tmp_path, capsys):
    save = tmp_path / "ckpt"
    save.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphans = [save / ".last.pt.k3j_x9ab.tmp", save / f".best_loss.pt.{dead.pid}.a1b2c3d4.tmp"]
    alive = save / f".last.pt.{os.getpid()}.zzzzzzzz.tmp"  # a live writer's: left alone
    for path in (*orphans, alive):
        path.write_bytes(b"half a checkpoint")
    train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1"))
    assert "removed 2 temp file(s) left by a killed run" in capsys.readouterr().out
    assert not any(p.exists() for p in orphans) and alive.exists()


def test_full_disk_under_recon_dir_is_one_line_and_keeps_the_checkpoint(prepared64, tmp_path, capsys, monkeypatch):
    import src.recon as recon

    def full_disk(path, write, durable=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(recon, "write_atomic", full_disk)
    with pytest.raises(SystemExit) as exit_info:  # after an epoch: stderr holds its progress bars, then one line
        run_cli(train_finetune_relu.main, common_args(prepared64, tmp_path, "--epochs", "1", *RECON))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert "error: could not write the recon PNGs of epoch_001" in last_line and "the disk is full" in last_line
    assert torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------- resume: the same data, dtypes by what they run

def test_resume_on_another_dataset_is_refused(finished_runs, prepared64, tmp_path, capsys):
    finished_runs.copy(tmp_path, *ONE_EPOCH)
    other = tmp_path / "other"
    shutil.copytree(prepared64, other)
    for extra in sorted((other / "train").glob("*.png"))[:3]:
        extra.unlink()
    err = one_line_error(train_finetune_relu.main, common_args(
        other, tmp_path, "--epochs", "1", "--resume", str(tmp_path / "ckpt" / "last.pt"), "--extend_epochs", "1"),
        capsys)
    assert "was trained on other data" in err and "train 24 -> 21 files" in err


def test_resume_compares_amp_dtype_by_what_it_resolves_to(finished_runs, prepared64, tmp_path, capsys):
    finished_runs.copy(tmp_path, "--epochs", "1", "--max_steps_per_epoch", "1", *AMP)
    train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1", "--max_steps_per_epoch", "1", *AMP,
                                         "--resume", str(tmp_path / "ckpt" / "last.pt"), "--extend_epochs", "1",
                                         "--amp_dtype", "bf16"))  # auto is bf16 on the CPU
    args = get_args_parser("x").parse_args(["--coco_dir", "d", "--amp_dtype", "fp16"])
    changes = resume_flag_changes({"amp_dtype": "auto"}, args, False, 1, 1, amp_dtypes=("bf16", "fp16"))
    assert changes == ["--amp_dtype auto (bf16) -> fp16 (fp16)"]


# ---------------------------------------------------------------- bad input: one line, before anything runs

def write_sized_crops(root, sizes):
    """A prepared folder whose train crops have the given (w, h) sizes, and a normal val crop."""
    for split, split_sizes in (("train", sizes), ("val", [(64, 64)])):
        (root / split).mkdir(parents=True)
        for index, (w, h) in enumerate(split_sizes):
            Image.fromarray(np.full((h, w, 3), 40 * index % 255, dtype=np.uint8)).save(root / split / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def fault_files(tmp_path_factory, finished_runs):
    root = tmp_path_factory.mktemp("faults")
    (root / "a_file").write_text("not a folder")
    write_sized_crops(root / "mixed", [(64, 64)] * 5 + [(96, 96)] * 2)
    write_sized_crops(root / "oblong", [(64, 96)] * 6)
    unreadable_val = root / "unreadable_val"
    shutil.copytree(finished_runs.data, unreadable_val)
    for victim in (unreadable_val / "val").glob("*.png"):
        victim.write_bytes(victim.read_bytes()[:200])
    arch = make_arch(quality=1, replace="relu", replace_parts="encoder")
    model = build_model(arch)
    torch.save({"state_dict": model.state_dict(), "arch": arch}, root / "no_args.pt")
    torch.save({"state_dict": model.state_dict(), "arch": {"quality": "high", "colour": 1}}, root / "bad_arch.pt")
    done = torch.load(finished_runs.get(*ONE_EPOCH) / "ckpt" / "last.pt", weights_only=True)
    done["arch"] = {"quality": 1, "replace": "sigmoid"}
    torch.save(done, root / "resume_bad_arch.pt")
    return {"tmp": root, "file": root / "a_file", "mixed": root / "mixed", "oblong": root / "oblong",
            "unreadable_val": unreadable_val, "no_args": root / "no_args.pt", "bad_arch": root / "bad_arch.pt",
            "resume_bad_arch": root / "resume_bad_arch.pt"}


BAD_INPUT = {
    "--crop_size 0": (["--use_prepared", "false", "--coco_dir", "{coco}", "--crop_size", "0"],
                      "--crop_size must be >= 1"),
    "raw crops too small for MS-SSIM": (["--use_prepared", "false", "--coco_dir", "{coco}", "--crop_size", "48"],
                                        "train crops of 48px are too small for MS-SSIM's 5 scales"),
    "--weight_decay -1": (["--weight_decay", "-1"], "--weight_decay must be a finite number >= 0"),
    "--onecycle_pct_start 5": (["--sched", "onecycle", "--onecycle_pct_start", "5"],
                               "--onecycle_pct_start must be in (0, 1)"),
    "--lr nan": (["--lr", "nan"], "--lr must be a finite number > 0"),
    "--lr inf": (["--lr", "inf"], "--lr must be a finite number > 0"),
    "--lambda_bpp -1": (["--lambda_bpp", "-1"], "--lambda_bpp must be a finite number >= 0"),
    "--overflow_tol -1": (["--overflow_tol", "-1"], "--overflow_tol must be a finite number > 0"),
    "--save_dir a file": (["--save_dir", "{file}"], "--save_dir {file} is a file, not a folder"),
    "--recon_dir a file": (["--recon_dir", "{file}", *RECON], "--recon_dir {file} is a file, not a folder"),
    "--save_dir not creatable": (["--save_dir", "{file}/ckpt"], "cannot be created"),
    "--recon_dir not creatable": (["--recon_dir", "{file}/recon", *RECON],
                                  "--recon_dir {file}/recon cannot be created"),
    "--coco_dir a file": (["--coco_dir", "{file}"], "--coco_dir {file} is a file, not a folder"),
    "prepared crops of mixed sizes": (["--coco_dir", "{mixed}"], "mixes crop sizes (64x64: 5"),
    "prepared crops not square": (["--coco_dir", "{oblong}"], "holds 64x96 crops; training needs square crops"),
    "unreadable val set": (["--coco_dir", "{unreadable_val}"], "no image of the val set"),
    "--crop_size in prepared mode": (["--crop_size", "128"], "--crop_size 128 contradicts the prepared crops"),
    "raw crop larger than every image": (["--use_prepared", "false", "--coco_dir", "{coco}", "--crop_size", "4096"],
                                         "--crop_size 4096 is larger than every image"),
    "--resume of a dict without args": (["--resume", "{no_args}"], "is not a training checkpoint of this project"),
    "--resume with a bad arch": (["--resume", "{resume_bad_arch}"], "unusable architecture description"),
    "--resume of a folder": (["--resume", "{tmp}"], "is a folder, not a checkpoint file"),
    "--base_checkpoint with a malformed arch": (["--base_checkpoint", "{bad_arch}"],
                                                "unusable architecture description"),
}


@pytest.mark.quick
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_training_input_is_one_line_before_training(case, fault_files, coco_root, prepared64, tmp_path, capsys):
    flags, needle = BAD_INPUT[case]
    names = {**fault_files, "coco": coco_root}
    argv = with_flags(common_args(prepared64, tmp_path), flags, names)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_finetune_relu.main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if not line.startswith("warning: skipping unreadable image")]  # each by name
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith("error:"), lines
    assert needle.format(**names) in errors[0], errors[0]
    assert not (tmp_path / "ckpt" / "last.pt").exists()


@pytest.mark.quick
@pytest.mark.parametrize("flags, needle", [
    (["--init_from_gdn", "true", "--gdn_fit_images", "0"], "--gdn_fit_images must be >= 1 with --init_from_gdn true"),
    (["--gdn_fit_steps", "-1"], "--gdn_fit_steps must be >= 1 with --init_from_gdn true (and never negative)"),
])
def test_bad_gdn_fit_flags_are_one_line_at_parsing(flags, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_finetune_npu.main(["--coco_dir", "/nonexistent", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err and "Traceback" not in err


# ---------------------------------------------------------------- non-finite steps

def test_nonfinite_steps_are_skipped_then_stop(finished_runs, prepared64, tmp_path, capsys):
    ckpt = torch.load(finished_runs.get(*ONE_EPOCH) / "ckpt" / "last.pt", weights_only=True)
    ckpt["state_dict"]["g_a.0.weight"] *= float("inf")
    save_checkpoint(ckpt, tmp_path / "nan.pt")
    with pytest.raises(engine.TrainingStopped, match="3 non-finite steps in a row"):
        train_finetune_relu.main(common_args(prepared64, tmp_path, "--base_checkpoint", str(tmp_path / "nan.pt"),
                                             "--max_bad_steps", "3", "--max_steps_per_epoch", "5"))
    out = capsys.readouterr().out
    assert out.count("step skipped") == 3
    assert not (tmp_path / "ckpt" / "last.pt").exists(), "nothing was trained, nothing is saved"


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_inf_gradient_with_finite_loss_is_skipped(clip, prepared64, tmp_path, capsys, monkeypatch):
    """bf16 / fp32 have no GradScaler: an inf gradient must not reach clip_grad_norm_ and Adam."""
    prepare = engine.setup.prepare_model
    poisoned = {"left": 2}

    def poison(grad):
        if poisoned["left"] > 0:
            poisoned["left"] -= 1
            return grad * float("inf")
        return grad

    def prepare_with_hook(*args, **kwargs):
        model = prepare(*args, **kwargs)
        engine.unwrap(model).g_s[0].weight.register_hook(poison)
        return model

    monkeypatch.setattr(engine.setup, "prepare_model", prepare_with_hook)
    summary = train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1", "--max_steps_per_epoch",
                                                   "4", "--train_scope", "all", "--max_grad_norm", clip))
    assert capsys.readouterr().out.count("step skipped") == 2 and summary["nonfinite_steps"] == 2
    assert all(torch.isfinite(p).all() for p in summary["model"].parameters())


def test_stopped_run_has_its_own_exit_code(finished_runs, prepared64, tmp_path, capsys):
    ckpt = torch.load(finished_runs.get(*ONE_EPOCH) / "ckpt" / "last.pt", weights_only=True)
    ckpt["state_dict"]["g_a.0.weight"] *= float("nan")
    save_checkpoint(ckpt, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_finetune_relu.main, common_args(prepared64, tmp_path, "--base_checkpoint",
                                                      str(tmp_path / "nan.pt"), "--max_bad_steps", "2"))
    assert exit_info.value.code == 3 and "non-finite steps in a row" in capsys.readouterr().err

