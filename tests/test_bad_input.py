"""Bad input to training, eval and export: one line, exit code 2, no traceback; unreadable images are skipped."""

import os
import shutil

import pytest
import torch

from src import train_finetune_relu
from src.checkpoint import save_checkpoint
from src.model_factory import build_model
from tests.conftest import ONE_EPOCH, common_args, one_line_error, with_flags


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
    "AMP dtype the device cannot run": (["--amp", "true", "--amp_dtype", "fp16"], "does not work"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, finished_runs):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "val").mkdir()
    (root / "junk.pt").write_bytes(b"\x00" * 64)
    torch.save({"config": {"lr": 1}}, root / "foreign.pt")
    torch.save({"state_dict": {}, "hook": os.system}, root / "evil.pt")
    q6 = build_model({"quality": 6, "replace": "relu", "replace_parts": "encoder"})
    torch.save(q6.state_dict(), root / "q6.pt")
    return {"tmp": root, "empty": root / "empty", "junk": root / "junk.pt", "foreign": root / "foreign.pt",
            "evil": root / "evil.pt", "q6": root / "q6.pt", "done": finished_runs.get(*ONE_EPOCH) / "ckpt" / "last.pt"}


@pytest.mark.quick
@pytest.mark.parametrize("case", sorted(BAD_TRAINING_INPUT))
def test_bad_training_input_is_one_line(case, bad_files, prepared64, tmp_path, capsys, monkeypatch):
    flags, needle = BAD_TRAINING_INPUT[case]
    argv = with_flags(common_args(prepared64, tmp_path), flags, bad_files)
    if case.startswith("AMP"):
        def no_autocast(*args, **kwargs):
            raise RuntimeError("autocast for this dtype is not supported")
        monkeypatch.setattr(torch, "autocast", no_autocast)
    assert needle in one_line_error(train_finetune_relu.main, argv, capsys)


@pytest.mark.quick
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


@pytest.mark.quick
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


def test_corrupt_prepared_file_is_reported_and_skipped(prepared64, tmp_path, capfd):
    data = tmp_path / "data"
    shutil.copytree(prepared64, data)
    victim = sorted((data / "train").glob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:100])
    summary = train_finetune_relu.main(common_args(data, tmp_path, "--epochs", "1", "--max_steps_per_epoch", "0",
                                                   "--num_workers", "1", "--batch_size", "4"))
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 0
    assert f"skipping unreadable image {victim}" in capfd.readouterr().err


def test_eval_skips_unreadable_images_and_export_refuses_them(finished_runs, prepared64, tmp_path, capsys):
    from scripts import export_onnx
    from src import eval as recipe_eval

    last = finished_runs.get(*ONE_EPOCH) / "ckpt" / "last.pt"
    folder = tmp_path / "photos"
    shutil.copytree(prepared64 / "val", folder)
    good = sorted(folder.glob("*.png"))
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:200])
    report = recipe_eval.main(["--image_dir", str(folder), "--checkpoint", str(last)])
    out = capsys.readouterr().out
    assert [img["name"] for img in report["results"][0]["images"]] == [p.name for p in good]
    assert "3 of 5 images skipped" in out and f"skipping {folder / 'truncated.png'}" in out
    for victim in good:
        victim.unlink()
    err = one_line_error(recipe_eval.main, ["--image_dir", str(folder), "--checkpoint",
                                            str(last)], capsys)
    assert "could be decoded" in err
    export = ["--ckpt", str(last), "--out", str(tmp_path / "e.onnx"), "--part", "encoder",
              "--input_size", "64"]
    err = one_line_error(export_onnx.main, export + ["--image", str(folder / "truncated.png")], capsys)
    assert "cannot be decoded" in err and "--image" in err
    moved = torch.load(last, weights_only=True)
    moved["args"]["coco_dir"] = str(tmp_path / "elsewhere")
    save_checkpoint(moved, tmp_path / "moved.pt")
    err = one_line_error(export_onnx.main, export[:1] + [str(tmp_path / "moved.pt")] + export[2:], capsys)
    assert "is not here; pass --image PATH" in err



def test_resume_of_the_other_scripts_run_names_the_script_first(float_run, prepared64, tmp_path, capsys):
    """A finished NPU run resumed by the ReLU script: the real reason, not 'nothing to do, add --extend_epochs'."""
    err = one_line_error(train_finetune_relu.main, common_args(prepared64, tmp_path, "--resume", str(float_run)),
                         capsys)
    assert "is a run of npu blocks" in err and "train_finetune_npu.py" in err and "nothing to do" not in err
    err = one_line_error(train_finetune_relu.main, common_args(prepared64, tmp_path, "--resume", str(float_run),
                                                               "--extend_epochs", "1"), capsys)
    assert "is a run of npu blocks" in err
