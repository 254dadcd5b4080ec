"""Every checkpoint format this project wrote still loads: fixtures written by the old code (tests/fixtures/).

Each fixture is read, evaluated, exported and resumed by today's code
(tests/fixtures/README.md says which commit wrote it and how); a checkpoint
written now carries the current format version, and a newer one is refused.
"""

import lzma
import math

import pytest
import torch

import train_finetune_npu
from scripts import export_onnx
from src import eval as recipe_eval
from src import train_finetune_relu
from src.checkpoint import read_checkpoint, save_checkpoint
from src.checkpoint_format import (FORMAT_VERSION, LOG_SCALE_GAIN, LOG_SPACE_SCALES, UPGRADES, legacy_version,
                                   upgrade_payload)
from src.cli import UserError
from src.model_factory import load_checkpoint_model, make_arch
from src.train_args import get_args_parser
from src.quant.fake_quant import activation_quantisers, qat_state
from src.quant.scheme import LOG_SCALE_GAIN as QAT_LOG_SCALE_GAIN, qat_scheme
from tests.conftest import REPO, final_state, one_line_error

FIXTURES = REPO / "tests" / "fixtures"
CROPS = FIXTURES / "crops64"  # the fixtures' training data: resume checks it is the same (names and sizes)
# (fixture, the format it was written in, its architecture's kind, QAT scheme)
LOADABLE = (("relu_first_engine", 0, "relu"), ("relu_single_file_engine", 2, "relu"), ("relu_single_file_engine_extended", 2, "relu"),
            ("qat_absolute_step_scales", 3, "npu"), ("relu_unversioned", 2, "relu"),
            ("qat_log_space_scales", 4, "npu"))
DERIVED = ("data_fingerprint", "amp_dtype_resolved")  # what setup wrote into the flags before format 5
# The flags the runs of tests/fixtures/make_fixtures.py gave (SMALL there): a resume must give the same.
SMALL = ("--quality", "1", "--pretrained", "false", "--batch_size", "2", "--num_workers", "0",
         "--max_steps_per_epoch", "2", "--recon_count", "1", "--log_every", "1", "--amp", "false",
         "--sched", "none", "--lr_warmup_steps", "3", "--train_scope", "all", "--distortion", "mse", "--epochs", "1")
FIRST_ENGINE = tuple(f for f in SMALL if f not in ("--distortion", "mse"))  # it had L1+MS-SSIM only
QAT = ("--qat", "true", "--qat_calib_dir", "tests/fixtures/crops64/train", "--qat_calib_count", "2",
       "--qat_scales", "learned")


def fixture_file(name, folder):
    """tests/fixtures/<name>.pt.xz decompressed into ``folder``: the bytes the old code wrote."""
    path = folder / f"{name}.pt"
    path.write_bytes(lzma.decompress((FIXTURES / f"{name}.pt.xz").read_bytes()))
    return path


def raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_dir_with(name, tmp_path):
    """A run folder holding fixture ``name`` as its last.pt, as the old run left it."""
    ckpt = tmp_path / "run" / "ckpt"
    ckpt.mkdir(parents=True)
    return fixture_file(name, ckpt).rename(ckpt / "last.pt")


def resume_argv(last, *extra, flags=SMALL):
    run = last.parent.parent
    return ["--coco_dir", str(CROPS), "--save_dir", str(run / "ckpt"), "--recon_dir", str(run / "recon"), *flags,
            *extra, "--resume", str(last), "--extend_epochs", "1"]


@pytest.mark.parametrize("name, version, kind", LOADABLE)
def test_every_earlier_format_reads_as_the_current_one(name, version, kind, tmp_path):
    path = fixture_file(name, tmp_path)
    on_disk = raw(path)
    assert "format_version" not in on_disk and legacy_version(on_disk) == version
    payload = read_checkpoint(path)
    assert payload["format_version"] == FORMAT_VERSION and payload["arch"]["replace"] == kind
    assert not set(DERIVED) & set(payload["args"]), "the flags are the flags as given"
    assert payload["data_fingerprint"] == on_disk["args"].get("data_fingerprint")
    assert payload["amp_dtype"] == on_disk["args"].get("amp_dtype_resolved")
    assert all(key in payload for key in ("epoch_step", "best_loss", "epochs_total", "world_size", "rng_per_rank"))
    assert {k: v for k, v in payload["args"].items()} == {k: v for k, v in on_disk["args"].items() if k not in DERIVED}
    model, arch, _ = load_checkpoint_model(path)
    assert arch == make_arch(**payload["arch"])


@pytest.mark.parametrize("name, version, kind", LOADABLE)
def test_every_earlier_format_evaluates_and_exports(name, version, kind, tmp_path):
    path = fixture_file(name, tmp_path)
    result = recipe_eval.main(["--coco_dir", str(CROPS), "--checkpoint", str(path)])["results"][0]
    assert result["mean"]["bpp_real"] > 0 and math.isfinite(result["mean"]["psnr"])
    image = str(next((CROPS / "val").iterdir()))
    report = export_onnx.main(["--ckpt", str(path), "--part", "decoder", "--out", str(tmp_path / "dec.onnx"),
                               "--input_size", "64", "--image", image])
    assert (tmp_path / "dec.onnx").stat().st_size > 0 and report


def test_the_single_file_engine_checkpoint_resumes_as_that_engine_did(tmp_path):
    """The single-file engine's run, continued by today's code, gives what that engine's own continuation
    gave (relu_single_file_engine_extended, written by it from the same file with the same flags)."""
    last = run_dir_with("relu_single_file_engine", tmp_path)
    train_finetune_relu.main(resume_argv(last))
    by_new, by_old = raw(last), raw(fixture_file("relu_single_file_engine_extended", tmp_path))
    assert by_new["epoch"] == by_old["epoch"] == 2 and by_new["step"] == by_old["step"] == 4
    # Close, not bit-equal: the fixture was written on one CPU with its thread count, and a convolution's sums
    # come in another order on another CPU or with another intra-op pool (pytest -n gives each worker its share);
    # bit-exact resume within one machine is tests/test_resume.py's.
    assert by_old["state_dict"].keys() == by_new["state_dict"].keys()
    for key in by_old["state_dict"]:
        torch.testing.assert_close(by_new["state_dict"][key], by_old["state_dict"][key], rtol=1e-4, atol=1e-6)
    for a, b in zip(by_old["optimizer"]["state"].values(), by_new["optimizer"]["state"].values()):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-7)
    assert by_new["scheduler"] == by_old["scheduler"] and by_new["scaler"] == by_old["scaler"]
    assert by_new["format_version"] == FORMAT_VERSION and by_new["arch"] == by_old["arch"]
    assert by_new["data_fingerprint"] == by_old["args"]["data_fingerprint"]
    # the flags are the old ones but for the QAT phase's (issue 22 replaced --qat_calib_steps/--qat_freeze_after)
    changed = set(by_new["args"]) ^ (set(by_old["args"]) - set(DERIVED))
    assert changed and all(name.startswith("qat_") for name in changed), changed


@pytest.mark.parametrize("name, flags", [("relu_first_engine", FIRST_ENGINE), ("relu_unversioned", SMALL)])
def test_an_unversioned_float_checkpoint_resumes_into_the_current_format(name, flags, tmp_path):
    last = run_dir_with(name, tmp_path)
    before = raw(last)
    train_finetune_relu.main(resume_argv(last, flags=flags))
    after = raw(last)
    assert after["format_version"] == FORMAT_VERSION and after["epoch"] == 2 and after["step"] == 4
    assert after["epochs_total"] == 2 and after["epoch_step"] == 0 and math.isfinite(after["best_loss"])
    assert not set(DERIVED) & set(after["args"]) and after["args"]["resume"] == str(last)
    assert after["data_fingerprint"]["train_files"] == 4
    if "data_fingerprint" in before["args"]:
        assert after["data_fingerprint"] == before["args"]["data_fingerprint"]


def test_the_log_space_qat_checkpoint_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # its --qat_calib_dir was saved relative to the repository
    last = run_dir_with("qat_log_space_scales", tmp_path)
    start = final_state(last)
    train_finetune_npu.main(resume_argv(last, *QAT))
    after = raw(last)
    assert after["epoch"] == 2 and after["step"] == 4 and after["arch"]["qat"] == qat_scheme("w8a8", "learned")
    moved = [k for k in start if k.endswith(".log_scale") and not torch.equal(start[k], after["state_dict"][k])]
    assert moved, "the learned scales went on training"


def test_the_absolute_step_qat_checkpoint_loads_converted_and_refuses_to_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    last = run_dir_with("qat_absolute_step_scales", tmp_path)
    old = raw(last)["state_dict"]
    model, arch, _ = load_checkpoint_model(last)
    assert arch["qat"]["learned_scales"] == LOG_SPACE_SCALES and qat_state(model) == "training with learned scales"
    learned = {name: fq for name, fq in activation_quantisers(model).items() if hasattr(fq, "log_scale")}
    assert learned
    for name, fq in learned.items():
        key = next(k for k in old if k.endswith(".scale") and k[: -len("scale")] + "learning_enabled" in old
                   and model.get_parameter(k[: -len("scale")] + "log_scale") is fq.log_scale)
        assert float(fq.scale.detach()) == pytest.approx(float(old[key]), rel=1e-6), name
    err = one_line_error(train_finetune_npu.main, resume_argv(last, *QAT), capsys)
    assert "learned scales were stepped as themselves" in err


def test_the_first_qat_scheme_is_refused_in_one_line(tmp_path, capsys):
    path = fixture_file("qat_observer_scheme", tmp_path)
    assert legacy_version(raw(path)) == 2 and "observer" in raw(path)["arch"]["qat"]
    err = one_line_error(recipe_eval.main, ["--coco_dir", str(CROPS), "--checkpoint", str(path)], capsys)
    assert "first QAT scheme" in err and "--base_checkpoint" in err
    err = one_line_error(export_onnx.main, ["--ckpt", str(path), "--out", str(tmp_path / "x.onnx")], capsys)
    assert "first QAT scheme" in err


def test_a_fixture_starts_a_run_as_base_checkpoint(tmp_path):
    base = fixture_file("relu_single_file_engine", tmp_path)
    run = tmp_path / "new"
    train_finetune_relu.main(["--coco_dir", str(CROPS), "--save_dir", str(run / "ckpt"), "--recon_dir",
                              str(run / "recon"), *SMALL, "--base_checkpoint", str(base)])
    assert raw(run / "ckpt" / "last.pt")["format_version"] == FORMAT_VERSION


def test_a_checkpoint_written_now_carries_the_current_version_and_the_flags_as_given(tmp_path):
    run = tmp_path / "now"
    argv = ["--coco_dir", str(CROPS), "--save_dir", str(run / "ckpt"), "--recon_dir", str(run / "recon"), *SMALL]
    train_finetune_relu.main(argv)
    payload = raw(run / "ckpt" / "last.pt")
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["data_fingerprint"]["train_files"] == 4 and payload["amp_dtype"] in ("bf16", "fp16")
    assert set(payload["args"]) == set(vars(get_args_parser("x").parse_args(argv))), "the flags, nothing derived"
    again = read_checkpoint(run / "ckpt" / "last.pt")  # the current format is read as it is
    assert again.keys() == payload.keys() and again["args"] == payload["args"] and again["arch"] == payload["arch"]


def test_a_newer_format_is_refused_in_one_line(tmp_path, capsys):
    path = fixture_file("relu_unversioned", tmp_path)
    save_checkpoint(dict(raw(path), format_version=FORMAT_VERSION + 1), path)
    with pytest.raises(UserError, match=rf"checkpoint format {FORMAT_VERSION + 1}, newer than this code reads"):
        read_checkpoint(path)
    err = one_line_error(recipe_eval.main, ["--coco_dir", str(CROPS), "--checkpoint", str(path)], capsys)
    assert f"format {FORMAT_VERSION + 1}" in err


def test_one_upgrade_step_per_format_and_the_gain_of_the_log_space_scales():
    assert len(UPGRADES) == FORMAT_VERSION
    assert QAT_LOG_SCALE_GAIN == LOG_SCALE_GAIN, "a new gain reads format-4 log scales wrongly: a new format version"
    assert LOG_SPACE_SCALES == qat_scheme()["learned_scales"]
    payload = {"state_dict": {"w": torch.zeros(1)}, "arch": {"quality": 1}}
    assert upgrade_payload(payload, "x")["arch"]["qat"] is None and payload["format_version"] == FORMAT_VERSION
