"""Resume and extend exactly, stop on a signal and continue, never lose a checkpoint to a crash or a full disk."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from src import train_finetune_relu
from src.checkpoint import read_checkpoint, save_checkpoint
from src.cli import UserError
from src.schedule import build_schedule
from tests.conftest import EXACT, REPO, assert_same_weights, common_args, final_state


def test_extending_a_finished_run_continues_exactly(prepared64, tmp_path, capsys):
    train_finetune_relu.main(common_args(prepared64, tmp_path / "straight", *EXACT, "--epochs", "4"))
    train_finetune_relu.main(common_args(prepared64, tmp_path / "split", *EXACT, "--epochs", "2"))
    last = tmp_path / "split" / "ckpt" / "last.pt"
    train_finetune_relu.main(common_args(prepared64, tmp_path / "split", *EXACT, "--epochs", "2",
                                         "--resume", str(last), "--extend_epochs", "2"))
    assert "LR stays" in capsys.readouterr().out
    assert_same_weights(final_state(tmp_path / "straight" / "ckpt" / "last.pt"), final_state(last))
    assert torch.load(last, weights_only=True)["epochs_total"] == 4
    with pytest.raises(UserError, match="finished its 4 epochs; add --extend_epochs"):
        train_finetune_relu.main(common_args(prepared64, tmp_path / "split", *EXACT, "--epochs", "2",
                                             "--resume", str(last)))


def lr_after(kind, epochs, steps_per_epoch, steps, lr=1e-4):
    """LR of a fresh ``kind`` schedule planned for ``epochs`` after ``steps`` steps (epoch ends included)."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = build_schedule(optimizer, kind, epochs, steps_per_epoch, lr)
    for step in range(steps):
        optimizer.step()
        schedule.after_step(step)
        if (step + 1) % steps_per_epoch == 0:
            schedule.after_epoch(1.0)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "plateau"])
def test_extend_epochs_rebuilds_the_schedule(kind, prepared64, tmp_path, capsys):
    flags = ("--sched", kind, "--max_steps_per_epoch", "2", "--epochs", "2")
    train_finetune_relu.main(common_args(prepared64, tmp_path, *flags))
    ended = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    capsys.readouterr()
    train_finetune_relu.main(common_args(prepared64, tmp_path, *flags, "--resume", str(tmp_path / "ckpt" / "last.pt"),
                                         "--extend_epochs", "3"))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("extending from 2 to 5"))
    if kind == "plateau":
        assert f"the LR stays {ended:.3g}" in line
    else:  # the LR jumps to where a 5-epoch schedule stands after 2 epochs, and runs that schedule's end
        assert f"from {ended:.3g} (where the run ended) to {lr_after(kind, 5, 2, 4):.3g}" in line
        final = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
        assert final == pytest.approx(lr_after(kind, 5, 2, 10), abs=1e-12)


def test_resume_refuses_changed_flags(finished_runs, prepared64, tmp_path):
    last = finished_runs.get() / "ckpt" / "last.pt"  # common_args' 2 epochs
    with pytest.raises(UserError, match=r"--lr 0.0001 -> 0.001; --seed 0 -> 3"):
        train_finetune_relu.main(common_args(prepared64, tmp_path, "--resume", str(last), "--extend_epochs", "1",
                                             "--lr", "1e-3", "--seed", "3"))
    unfinished = torch.load(last, weights_only=True)
    unfinished["epoch"] = 1
    save_checkpoint(unfinished, tmp_path / "unfinished.pt")
    with pytest.raises(UserError, match=r"--epochs 2 -> 8; --sched cosine -> onecycle"):
        train_finetune_relu.main(common_args(prepared64, tmp_path, "--resume", str(tmp_path / "unfinished.pt"),
                                             "--epochs", "8", "--sched", "onecycle"))
    with pytest.raises(UserError, match="--extend_epochs needs --resume"):
        train_finetune_relu.main(common_args(prepared64, tmp_path, "--extend_epochs", "1"))


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_saves_mid_epoch_and_resume_is_exact(workers, prepared64, tmp_path):
    """With workers too: a DataLoader with workers must resume the epoch after its done batches, not at its start."""
    flags = [*EXACT[:-1], "6", "--epochs", "2", "--num_workers", workers]
    train_finetune_relu.main(common_args(prepared64, tmp_path / "straight", *flags))
    argv = common_args(prepared64, tmp_path / "stopped", *flags)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "src.train_finetune_relu", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("training on"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received" in out and "Resume with" in err and "Traceback" not in err
    last = tmp_path / "stopped" / "ckpt" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0 and saved["epoch_step"] >= 1
    train_finetune_relu.main(argv + ["--resume", str(last)])
    assert_same_weights(final_state(tmp_path / "straight" / "ckpt" / "last.pt"), final_state(last))


@pytest.mark.quick
def test_raw_coco_crops_depend_on_seed_epoch_and_index_only(coco_root):
    from src.data import RawCocoCrops

    ds = RawCocoCrops(coco_root / "train2017", 64, random_crop=True, seed=1)
    torch.manual_seed(123)
    first = ds[(0, 2)]
    torch.manual_seed(456)  # the global RNG (a worker's, a rank's) plays no part
    assert torch.equal(first, ds[(0, 2)])
    assert not torch.equal(first, ds[(1, 2)]) and not torch.equal(first, RawCocoCrops(
        coco_root / "train2017", 64, random_crop=True, seed=2)[(0, 2)])


def test_raw_coco_resume_is_exact_with_workers(coco_root, tmp_path):
    flags = ("--use_prepared", "false", "--crop_size", "64", "--num_workers", "1", *EXACT[:-1], "2")
    train_finetune_relu.main(common_args(coco_root, tmp_path / "straight", *flags, "--epochs", "4"))
    train_finetune_relu.main(common_args(coco_root, tmp_path / "split", *flags, "--epochs", "2"))
    last = tmp_path / "split" / "ckpt" / "last.pt"
    train_finetune_relu.main(common_args(coco_root, tmp_path / "split", *flags, "--epochs", "2",
                                         "--resume", str(last), "--extend_epochs", "2"))
    assert_same_weights(final_state(tmp_path / "straight" / "ckpt" / "last.pt"), final_state(last))


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, target)
    writer = ("import torch, sys; sys.path.insert(0, %r)\n"
              "from src.checkpoint import save_checkpoint\n"
              "big = {'state_dict': {'w': torch.ones(64, 1024, 1024)}, 'epoch': 2}\n"
              "print('saving', flush=True)\n"
              "while True: save_checkpoint(big, %r)\n") % (str(REPO), str(target))
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    payload = read_checkpoint(target)
    assert payload["epoch"] in (1, 2)
    assert payload["state_dict"]["w"].numel() in (3, 64 * 1024 * 1024)


@pytest.mark.quick
def test_full_disk_during_save_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    import src.checkpoint as checkpoint

    target = tmp_path / "last.pt"
    save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, target)

    def torch_save_on_a_full_disk(obj, handle):  # what torch.save raises when the write runs out of space
        handle.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match=r"could not write .*last.pt: the disk is full \(about 4.0 MiB needed, "
                                         r"0.0 MiB free there\)"):
        save_checkpoint({"state_dict": {"w": torch.zeros(1024, 1024)}, "epoch": 2}, target)
    assert read_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temp file is left behind"


@pytest.mark.quick
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(umask, mode, coco_root, tmp_path):
    from scripts import coco_prepare

    old = os.umask(umask)
    try:
        save_checkpoint({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "c.pt")
        coco_prepare.main(["--coco_dir", str(coco_root), "--out_dir", str(tmp_path / "crops"), "--crop_size", "64",
                           "--workers", "1", "--max_images", "1"])
    finally:
        os.umask(old)
    written = [tmp_path / "c.pt", tmp_path / "crops" / "manifest.json", *(tmp_path / "crops" / "train").glob("*.png")]
    assert len(written) > 2 and {p.stat().st_mode & 0o777 for p in written} == {mode}
