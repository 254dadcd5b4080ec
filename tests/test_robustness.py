"""Multi-process training, exact resume, signals, crashes and bad input (issue: a run that loses nothing)."""

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
from src.cli import run_cli
from src.model_factory import build_model, load_weights
from tests.test_training import common_args

REPO = Path(__file__).resolve().parents[1]


def final_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_torchrun_two_cpu_processes(prepared64, tmp_path):
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--train_scope", "all")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                             "29517", "-m", "src.train_finetune_relu", *argv],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
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


def test_resume_continues_exactly(prepared64, tmp_path):
    train_finetune_relu.main(common_args(prepared64, tmp_path / "straight", *EXACT, "--epochs", "4"))
    train_finetune_relu.main(common_args(prepared64, tmp_path / "split", *EXACT, "--epochs", "2"))
    train_finetune_relu.main(common_args(prepared64, tmp_path / "split", *EXACT, "--epochs", "4",
                                         "--resume", str(tmp_path / "split" / "ckpt" / "last.pt")))
    assert_same_weights(final_state(tmp_path / "straight" / "ckpt" / "last.pt"),
                        final_state(tmp_path / "split" / "ckpt" / "last.pt"))


def test_sigterm_saves_mid_epoch_and_resume_is_exact(prepared64, tmp_path):
    flags = [*EXACT[:-1], "6", "--epochs", "2"]
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
