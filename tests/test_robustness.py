"""Multi-process training, exact resume, signals, crashes and bad input (issue: a run that loses nothing)."""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src import engine, train_finetune_relu
from src.checkpoint import read_checkpoint, save_checkpoint
from src.cli import UserError, run_cli
from src.model_factory import build_model, load_weights
from src.schedule import build_schedule
from tests.test_training import common_args

REPO = Path(__file__).resolve().parents[1]


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


def test_torchrun_two_cpu_processes(prepared64, tmp_path):
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--train_scope", "all")
    result = torchrun("src.train_finetune_relu", argv, 29517)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x2 |" in result.stdout and "effective batch 4" in result.stdout
    assert "same on all 2 ranks" in result.stdout
    assert result.stdout.count("epoch 1/1") == 1, "only rank 0 prints"
    printed = float(result.stdout.split("weights checksum ")[1].split()[0])
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    model = load_weights(build_model(ckpt["arch"]), ckpt["state_dict"], "ddp")
    assert engine.weights_checksum(model) == pytest.approx(printed, rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "recon" / "epoch_001").iterdir()) == ["00000.png", "00001.png"]


EXACT = ("--sched", "none", "--lr_warmup_steps", "3", "--train_scope", "all", "--max_steps_per_epoch", "3")


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


def test_resume_refuses_changed_flags(prepared64, tmp_path):
    train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "2"))
    last = tmp_path / "ckpt" / "last.pt"
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


def test_nonfinite_steps_are_skipped_then_stop(prepared64, tmp_path, capsys):
    train_finetune_relu.main(common_args(prepared64, tmp_path / "base", "--epochs", "1"))
    ckpt = torch.load(tmp_path / "base" / "ckpt" / "last.pt", weights_only=True)
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


def test_torchrun_rank_with_an_all_corrupt_batch_does_not_hang(prepared64, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared64, data)
    for victim in sorted((data / "train").glob("*.png"))[::2]:  # every other crop: some rank's batch of 1 is bad
        victim.write_bytes(b"not a png")
    argv = common_args(data, tmp_path, "--epochs", "1", "--max_steps_per_epoch", "0", "--batch_size", "1",
                       "--device", "cpu", "--train_scope", "all")
    result = torchrun("src.train_finetune_relu", argv, 29519)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "an empty batch, step skipped" in result.stdout and "same on all 2 ranks" in result.stdout


def test_torchrun_rank_with_a_whole_corrupt_epoch_does_not_abort(prepared64, tmp_path):
    """Every file rank 1 draws in epoch 0 cut to 200 bytes: the epoch's metric reduce has one shape on every rank."""
    from torch.utils.data import DistributedSampler

    from src.data import PreparedCrops

    data = tmp_path / "data"
    shutil.copytree(prepared64, data)
    dataset = PreparedCrops(data / "train")
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    for index in sampler:
        victim = dataset.files[index]
        victim.write_bytes(victim.read_bytes()[:200])
    argv = common_args(data, tmp_path, "--epochs", "1", "--device", "cpu", "--train_scope", "all")
    result = torchrun("src.train_finetune_relu", argv, 29529)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every train step of this epoch was skipped" in result.stdout and "same on all 2 ranks" in result.stdout


def test_torchrun_sigterm_resume_is_exact(prepared64, tmp_path):
    flags = [*EXACT[:-1], "4", "--epochs", "2", "--device", "cpu", "--num_workers", "1"]
    straight = torchrun("src.train_finetune_relu", common_args(prepared64, tmp_path / "straight", *flags), 29531)
    assert straight.returncode == 0, straight.stderr[-3000:]
    argv = common_args(prepared64, tmp_path / "stopped", *flags)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                             "29533", "-m", "src.train_finetune_relu", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    progress = ""
    while "| 1/4 [" not in progress:  # rank 0's first step is done, so both ranks are in the loop
        progress += proc.stderr.read(1) or pytest.fail(f"the run ended before its first step: {progress[-3000:]}")
    # To the ranks, as a cluster's scheduler sends it: torchrun forwards a SIGTERM of its own, but SIGKILLs
    # ranks still saving 30 s later, which a loaded 2-core test machine can exceed.
    ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for rank in ranks:
        os.kill(int(rank), signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert len(ranks) == 2 and err.count("stopped by SIGTERM after step") == 2, err[-3000:]
    last = tmp_path / "stopped" / "ckpt" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0 and saved["epoch_step"] >= 1
    resumed = torchrun("src.train_finetune_relu", argv + ["--resume", str(last)], 29535)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_state(tmp_path / "straight" / "ckpt" / "last.pt"), final_state(last))


def test_corrupt_prepared_file_is_reported_and_skipped(prepared64, tmp_path, capfd):
    data = tmp_path / "data"
    shutil.copytree(prepared64, data)
    victim = sorted((data / "train").glob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:100])
    summary = train_finetune_relu.main(common_args(data, tmp_path, "--epochs", "1", "--max_steps_per_epoch", "0",
                                                   "--num_workers", "1", "--batch_size", "4"))
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 0
    assert f"skipping unreadable image {victim}" in capfd.readouterr().err


def one_line_error(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


BAD_TRAINING_INPUT = {
    "missing --coco_dir": (["--coco_dir", "{tmp}/nowhere"], "not found"),
    "no train/ in prepared dir": (["--coco_dir", "{tmp}"], "scripts.coco_prepare"),
    "empty dataset": (["--coco_dir", "{empty}"], "holds no images"),
    "--local_fp32 custom without names": (["--local_fp32", "custom"], "--local_fp32_custom"),
    "onecycle with warmup": (["--sched", "onecycle", "--lr_warmup_steps", "10"], "onecycle"),
    "--train_scope replaced with GDN control": (["--replace_parts", "none"], "--train_scope all"),
    "--device cuda without CUDA": (["--device", "cuda"], "no CUDA device"),
    "--resume of a missing file": (["--resume", "{tmp}/missing.pt"], "not found"),
    "--resume of a non-checkpoint": (["--resume", "{junk}"], "not a readable PyTorch checkpoint"),
    "--base_checkpoint of another program": (["--base_checkpoint", "{foreign}"], "no model weights"),
    "--base_checkpoint with pickled code": (["--base_checkpoint", "{evil}"], "refused to load"),
    "--base_checkpoint of another quality": (["--base_checkpoint", "{q6}"], "wrong shape"),
    "--epochs already done on resume": (["--resume", "{done}", "--epochs", "1"], "nothing to do"),
    "AMP dtype the device cannot run": (["--amp_dtype", "fp16"], "does not work"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, prepared64):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "val").mkdir()
    (root / "junk.pt").write_bytes(b"\x00" * 64)
    torch.save({"config": {"lr": 1}}, root / "foreign.pt")
    torch.save({"state_dict": {}, "hook": os.system}, root / "evil.pt")
    q6 = build_model({"quality": 6, "replace": "relu", "replace_parts": "encoder"})
    torch.save(q6.state_dict(), root / "q6.pt")
    train_finetune_relu.main(common_args(prepared64, root / "done", "--epochs", "1"))
    return {"tmp": root, "empty": root / "empty", "junk": root / "junk.pt", "foreign": root / "foreign.pt",
            "evil": root / "evil.pt", "q6": root / "q6.pt", "done": root / "done" / "ckpt" / "last.pt"}


@pytest.mark.parametrize("case", sorted(BAD_TRAINING_INPUT))
def test_bad_training_input_is_one_line(case, bad_files, prepared64, tmp_path, capsys, monkeypatch):
    flags, needle = BAD_TRAINING_INPUT[case]
    argv = common_args(prepared64, tmp_path)
    for flag, value in zip(flags[::2], flags[1::2]):
        value = value.format(**bad_files)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if case.startswith("AMP"):
        def no_autocast(*args, **kwargs):
            raise RuntimeError("autocast for this dtype is not supported")
        monkeypatch.setattr(torch, "autocast", no_autocast)
    assert needle in one_line_error(train_finetune_relu.main, argv, capsys)


@pytest.mark.parametrize("flags, needle", [
    (["--enc_t", "1.5", "--enc_residual", "false"], "--enc_t must be >= 2 with --enc_residual false"),
    (["--enc_kdw", "4"], "--enc_kdw must be a positive odd kernel size"),
    (["--dec_gmin", "2.0", "--dec_gmax", "2.0"], "--dec_gmin must be >= 0 and < --dec_gmax"),
    (["--dec_residual", "false", "--dec_gmin", "1.0"], "--dec_residual false needs --dec_gmin < 1 < --dec_gmax"),
])
def test_bad_npu_block_flags_are_one_line_at_parsing(flags, needle, capsys):
    import train_finetune_npu

    with pytest.raises(SystemExit) as exit_info:
        train_finetune_npu.main(["--coco_dir", "/nonexistent", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err and "Traceback" not in err


def test_stopped_run_has_its_own_exit_code(prepared64, tmp_path, capsys):
    train_finetune_relu.main(common_args(prepared64, tmp_path / "base", "--epochs", "1"))
    ckpt = torch.load(tmp_path / "base" / "ckpt" / "last.pt", weights_only=True)
    ckpt["state_dict"]["g_a.0.weight"] *= float("nan")
    save_checkpoint(ckpt, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_finetune_relu.main, common_args(prepared64, tmp_path, "--base_checkpoint",
                                                      str(tmp_path / "nan.pt"), "--max_bad_steps", "2"))
    assert exit_info.value.code == 3 and "non-finite steps in a row" in capsys.readouterr().err


def test_wandb_dir_is_respected(prepared64, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_here"))
    train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1", "--wandb", "true"))
    assert list((tmp_path / "wandb_here").rglob("run-*.wandb"))
    assert not (tmp_path / "ckpt" / "wandb").exists()


@pytest.mark.parametrize("content", [b"just some text\n", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b""])
def test_any_non_checkpoint_file_is_one_line(content, prepared64, tmp_path, capsys):
    from scripts import export_onnx
    from src import eval as recipe_eval

    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    for flag in ("--resume", "--base_checkpoint"):
        err = one_line_error(train_finetune_relu.main, common_args(prepared64, tmp_path, flag, str(bad)), capsys)
        assert str(bad) in err and "not a readable PyTorch checkpoint" in err
    err = one_line_error(recipe_eval.main, ["--image_dir", str(prepared64 / "val"), "--checkpoint", str(bad)], capsys)
    assert str(bad) in err
    err = one_line_error(export_onnx.main, ["--ckpt", str(bad), "--out", str(tmp_path / "x.onnx")], capsys)
    assert str(bad) in err


def test_eval_skips_unreadable_images_and_export_refuses_them(prepared64, tmp_path, capsys):
    from scripts import export_onnx
    from src import eval as recipe_eval

    train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1"))
    folder = tmp_path / "photos"
    shutil.copytree(prepared64 / "val", folder)
    good = sorted(folder.glob("*.png"))
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:200])
    report = recipe_eval.main(["--image_dir", str(folder), "--checkpoint", str(tmp_path / "ckpt" / "last.pt")])
    out = capsys.readouterr().out
    assert [img["name"] for img in report["results"][0]["images"]] == [p.name for p in good]
    assert "3 of 5 images skipped" in out and f"skipping {folder / 'truncated.png'}" in out
    for victim in good:
        victim.unlink()
    err = one_line_error(recipe_eval.main, ["--image_dir", str(folder), "--checkpoint",
                                            str(tmp_path / "ckpt" / "last.pt")], capsys)
    assert "could be decoded" in err
    export = ["--ckpt", str(tmp_path / "ckpt" / "last.pt"), "--out", str(tmp_path / "e.onnx"), "--part", "encoder",
              "--input_size", "64"]
    err = one_line_error(export_onnx.main, export + ["--image", str(folder / "truncated.png")], capsys)
    assert "cannot be decoded" in err and "--image" in err
    moved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    moved["args"]["coco_dir"] = str(tmp_path / "elsewhere")
    save_checkpoint(moved, tmp_path / "moved.pt")
    err = one_line_error(export_onnx.main, export[:1] + [str(tmp_path / "moved.pt")] + export[2:], capsys)
    assert "is not here; pass --image PATH" in err


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


def test_torchrun_hyperprior_recon_per_rank_rng(prepared64, tmp_path):
    """A hyperprior under DDP with no rate term (h_a/h_s frozen), and each rank its own RNG stream."""
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--model", "bmshj2018-hyperprior",
                       "--replace_parts", "all", "--train_scope", "all")
    result = torchrun("src.train_finetune_relu", argv, 29521)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hyperprior" in result.stdout and "same on all 2 ranks" in result.stdout
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    first, second = ckpt["rng_per_rank"]
    assert not torch.equal(first["torch"], second["torch"]), "ranks must not share quantisation noise"


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


def test_torchrun_init_from_gdn_fits_on_rank_0_and_broadcasts(prepared64, tmp_path):
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--train_scope", "all",
                       "--init_from_gdn", "true", "--gdn_fit_steps", "5", "--gdn_fit_images", "4")
    result = torchrun("train_finetune_npu.py", argv, 29523)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("init_from_gdn: fitting 6 blocks") == 1 and "same on all 2 ranks" in result.stdout


def test_torchrun_qat_ranks_share_rank_0s_scales(prepared64, tmp_path):
    """QAT under DDP: parametrised weights, hooks and broadcast observer buffers train to the same weights."""
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--train_scope", "all",
                       "--qat", "true", "--qat_calib_steps", "1", "--amp", "false")
    result = torchrun("train_finetune_npu.py", argv, 29527)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QAT: observers calibrated" in result.stdout and "same on all 2 ranks" in result.stdout


def _agree_worker(rank, init_file, results):
    import torch.distributed as dist

    from src.distributed import DistInfo
    from src.cli import StopRequest

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    tr = argparse.Namespace(device=torch.device("cpu"), dist=DistInfo(rank, 2, rank), stop=StopRequest())
    overflow = "first bad output in module 'g_a.2'" if rank == 1 else None
    verdict = engine.agree_on_step(tr, torch.tensor(rank == 0), overflow)
    results[rank] = (verdict.skip, verdict.stop, verdict.overflow)
    dist.destroy_process_group()


def test_all_ranks_agree_on_an_overflow_seen_by_one(tmp_path):
    """--overflow_check on one rank must stop every rank with the same message (no rank left in a collective)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agree_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
        assert dict(results) == {r: (True, False, "first bad output in module 'g_a.2'") for r in (0, 1)}


def test_torchrun_only_rank_0_downloads_zoo_weights(prepared64, tmp_path):
    """Offline (a proxy on a closed loopback port): one download attempt and one error line, not one per rank."""
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "hub"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--pretrained", "true")
    result = torchrun("src.train_finetune_relu", argv, 29525, env=env)
    assert result.returncode != 0
    assert result.stderr.count("could not download CompressAI's pretrained") == 1, result.stderr[-3000:]
