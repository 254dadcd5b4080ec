import argparse
import math
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import train_finetune_npu
from src import engine, train_finetune_relu
from src.checkpoint import read_checkpoint, save_checkpoint
from src.cli import UserError, run_cli
from src.data import PreparedCrops
from src.losses import RecipeLoss, msssim_window
from src.model_factory import build_model, make_arch
from src.precision import apply_local_fp32
from src.schedule import build_schedule
from src.train_args import get_args_parser
from tests.conftest import AMP, GDN_CONTROL, ONE_EPOCH, RECON, common_args

REPO = Path(__file__).resolve().parents[1]


def assert_run_outputs(tmp_path, replace):
    for name in ("last.pt", "best_msssim.pt"):
        ckpt = torch.load(tmp_path / "ckpt" / name, map_location="cpu", weights_only=True)
        assert ckpt["arch"]["replace"] == replace
        assert {"state_dict", "optimizer", "scheduler", "scaler", "epoch", "step", "best_msssim", "args",
                "rng"} <= set(ckpt)
        assert isinstance(ckpt["args"], dict) and ckpt["args"]["quality"] == 1
        assert ckpt["state_dict"]["entropy_bottleneck._quantized_cdf"].numel() > 0, "update() must run before save"
    assert torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["epoch"] == 2
    for tag in ("origin", "epoch_001", "epoch_002"):
        files = sorted(p.name for p in (tmp_path / "recon" / tag).glob("*.png"))
        assert files == ["00000.png", "00001.png"], tag
    assert Image.open(tmp_path / "recon" / "report.png").size[1] > 500, "training ends with the recon sheet"


def test_relu_script_end_to_end(prepared64, tmp_path, capsys):
    summary = train_finetune_relu.main(common_args(prepared64, tmp_path, "--wandb", "true", *RECON, *AMP))
    assert_run_outputs(tmp_path, "relu")
    out = capsys.readouterr().out
    for word in ("RD", "L1", "1-MSSSIM", "BPP", "λ", "MSSSIM", "PSNR"):
        assert word in out
    assert "replaced: g_a.1, g_a.3, g_a.5" in out
    assert summary["steps"] == 4
    from src.recon import read_rate
    for epoch in summary["epochs"]:  # the sheet's rate: the epoch's val bpp, beside recon/<tag>/
        rate = read_rate(tmp_path / "recon", f"epoch_{epoch['epoch']:03d}")
        assert rate["kind"] == "estimated" and rate["bpp"] == pytest.approx(epoch["val"]["bpp"])
        assert rate["psnr"] == pytest.approx(epoch["val"]["psnr"])
    val0 = PreparedCrops(prepared64 / "val")[0]  # origin PNGs are the first val crops, index for index
    png = pil_to_tensor(Image.open(tmp_path / "recon" / "origin" / "00000.png"))
    assert val0.dtype == torch.uint8 and torch.equal(png, val0)
    runs = list((tmp_path / "ckpt" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs, "W&B offline run should be written"
    data = runs[0].read_bytes()
    for key in (b"train/rd/bpp", b"train/rd/1-msssim", b"val/ms_ssim", b"recon/epoch_002", b"recon/report", b"lr"):
        assert key in data


def test_npu_script_end_to_end(prepared64, tmp_path):
    train_finetune_npu.main(common_args(prepared64, tmp_path, "--enc_t", "1.5", "--dec_gmax", "3.0",
                                        *AMP, "--amp_dtype", "fp16", *RECON))
    assert_run_outputs(tmp_path, "npu")
    arch = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["arch"]
    assert arch["replace_parts"] == "all" and arch["enc_kwargs"]["t"] == 1.5 and arch["dec_kwargs"]["g_max"] == 3.0


@pytest.mark.quick
def test_npu_script_defaults():
    args = train_finetune_npu.get_npu_args_parser().parse_args(["--coco_dir", "x"])
    assert (args.replace_parts, args.save_dir, args.recon_dir) == ("all", "./checkpoints_npu", "./recon_npu")
    assert (args.enc_t, args.enc_kdw, args.enc_eca, args.dec_gmin, args.dec_gmax) == (2.0, 3, True, 0.5, 2.0)
    relu = get_args_parser("x").parse_args(["--coco_dir", "x"])
    assert (relu.alpha_l1, relu.amp, relu.amp_dtype, relu.max_grad_norm, relu.lambda_bpp, relu.wandb) == \
        (0.4, True, "auto", 1.0, 0.01, False)


def test_raw_coco_mode(coco_root, tmp_path):
    train_finetune_relu.main(common_args(coco_root, tmp_path, "--use_prepared", "false", "--crop_size", "64",
                                         "--epochs", "1"))
    assert (tmp_path / "ckpt" / "last.pt").exists()


def test_fixed_batch_overfits():
    torch.manual_seed(0)
    model = build_model(make_arch(quality=1, replace="relu", replace_parts="all"))
    x = torch.rand(2, 3, 64, 64)
    criterion = RecipeLoss(0.4, "rd", 0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        parts = criterion(model(x), x)
        optimizer.zero_grad()
        parts["total"].backward()
        optimizer.step()
        losses.append(parts["total"].item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.quick
def test_loss_is_fp32_and_matches_formula():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    x_hat = (x + 0.05 * torch.randn_like(x)).bfloat16()
    likelihoods = {"y": torch.rand(2, 8, 4, 4).clamp_min(1e-3).bfloat16()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = RecipeLoss(0.3, "rd", 0.5)({"x_hat": x_hat, "likelihoods": likelihoods}, x)
    assert all(v.dtype == torch.float32 for v in parts.values())
    # The expected value is built from the definitions, not from the loss's own parts.
    from pytorch_msssim import ms_ssim

    bpp = -torch.log2(likelihoods["y"].float()).sum() / (2 * 64 * 64)
    l1 = (x - x_hat.float()).abs().mean()
    msssim = ms_ssim(x_hat.float().clamp(0, 1), x, data_range=1.0, win_size=3)
    torch.testing.assert_close(parts["bpp"], bpp)
    torch.testing.assert_close(parts["total"], 0.3 * l1 + 0.7 * (1 - msssim) + 0.5 * bpp)


@pytest.mark.quick
def test_small_crops_adapt_msssim_window_once(capsys):
    msssim_window.cache_clear()
    assert msssim_window(64) == 3 and msssim_window(64) == 3 and msssim_window(224) == 11
    assert capsys.readouterr().out.count("note:") == 1


@pytest.mark.quick
def test_local_fp32_entropy_gives_fp32_bpp_under_bf16():
    torch.manual_seed(0)
    model = build_model(make_arch(quality=1, replace="relu")).eval()
    with torch.no_grad():
        y = model.g_a(torch.rand(1, 3, 64, 64))
        _, fp32 = model.entropy_bottleneck(y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, plain_bf16 = model.entropy_bottleneck(y)
        assert apply_local_fp32(model, "entropy") == ["entropy_bottleneck"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, local = model.entropy_bottleneck(y)
    assert not torch.equal(plain_bf16.float(), fp32), "bf16 must change the likelihoods, or the test proves nothing"
    assert local.dtype == torch.float32 and torch.equal(local, fp32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 3, 64, 64))
    assert out["likelihoods"]["y"].dtype == torch.float32


@pytest.mark.quick
@pytest.mark.parametrize("replace, parts, mode, expected", [
    ("none", "none", "entropy", ["entropy_bottleneck"]),
    ("none", "none", "entropy+decoder", ["entropy_bottleneck", "g_s.1", "g_s.3", "g_s.5"]),  # IGDN, not convs
    ("none", "none", "all_normexp", ["entropy_bottleneck", "g_a.1", "g_a.3", "g_a.5", "g_s.1", "g_s.3", "g_s.5"]),
    ("relu", "all", "entropy+decoder", ["entropy_bottleneck"]),
    ("relu", "decoder", "all_normexp", ["entropy_bottleneck", "g_a.1", "g_a.3", "g_a.5"]),
    ("relu", "encoder", "entropy+decoder", ["entropy_bottleneck", "g_s.1", "g_s.3", "g_s.5"]),
    ("npu", "all", "entropy+decoder", ["entropy_bottleneck"]),
    ("npu", "encoder", "all_normexp", ["entropy_bottleneck", "g_s.1", "g_s.3", "g_s.5"]),
])
def test_local_fp32_policies_choose_modules(replace, parts, mode, expected):
    model = build_model(make_arch(quality=1, replace=replace, replace_parts=parts))
    assert apply_local_fp32(model, mode) == expected


@pytest.mark.quick
def test_local_fp32_custom_picks_by_class_name():
    model = build_model(make_arch(quality=1, replace="npu", replace_parts="all"))
    assert apply_local_fp32(model, "custom", ["GDNishLiteDec"]) == ["g_s.1", "g_s.3", "g_s.5"]


def lr_curve(kind, epochs=3, steps=5, warmup=0, lr=1.0):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = build_schedule(optimizer, kind, epochs, steps, lr, warmup, 0.3)
    curve, step = [], 0
    for _ in range(epochs):
        for _ in range(steps):
            curve.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.after_step(step)
            step += 1
        schedule.after_epoch(val_loss=1.0)
    return curve


@pytest.mark.quick
def test_lr_curve_cosine_with_warmup():
    curve = lr_curve("cosine", warmup=4)
    cosine = [(1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    expected = [min(1.0, (s + 1) / 4) * cosine[s // 5] for s in range(15)]
    assert curve == pytest.approx(expected, rel=1e-6)


@pytest.mark.quick
def test_lr_curve_onecycle_steps_per_step_and_plateau_per_epoch():
    curve = lr_curve("onecycle")
    assert len(set(curve)) == len(curve), "onecycle changes the LR every step"
    assert curve[0] == pytest.approx(1.0 / 25) and max(curve) > 0.95 and curve[-1] < 1e-3
    assert 3 <= curve.index(max(curve)) <= 5  # pct_start 0.3 of 15 steps
    plateau = lr_curve("plateau", epochs=6, steps=2)
    assert plateau[:8] == [1.0] * 8 and plateau[-1] == 0.5  # patience 2: halves after the 4th flat epoch
    assert lr_curve("none") == [1.0] * 15
    with pytest.raises(ValueError, match="onecycle"):
        lr_curve("onecycle", warmup=3)


def test_gradient_clipping_is_applied_and_can_be_disabled(prepared64, tmp_path, monkeypatch):
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        params = list(params)
        total = real_clip(params, max_norm, *a, **k)
        seen.append((max_norm, torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1", "--max_grad_norm", "1e-3"))
    assert len(seen) == 2 and all(m == 1e-3 and norm <= 1e-3 * 1.01 for m, norm in seen)
    seen.clear()
    train_finetune_relu.main(common_args(prepared64, tmp_path / "b", "--epochs", "1", "--max_grad_norm", "0"))
    assert seen == []


def test_fp16_clips_unscaled_gradients(prepared64, tmp_path, monkeypatch):
    """Under fp16 the GradScaler multiplies the loss by 2**16: clipping must see the unscaled gradients.

    A missing ``scaler.unscale_`` would hand clip_grad_norm_ gradients ~65536x those of the same step in bf16.
    """
    norms = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        params = list(params)
        total = real_clip(params, max_norm, *a, **k)
        if torch.isfinite(total):  # fp16's first steps may overflow at the initial scale (the scaler skips them)
            norms.setdefault(current, float(total))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    for current in ("bf16", "fp16"):
        train_finetune_relu.main(common_args(prepared64, tmp_path / current, "--epochs", "1", "--max_steps_per_epoch",
                                             "4", "--amp", "true", "--amp_dtype", current, "--max_grad_norm", "1e9"))
    assert set(norms) == {"bf16", "fp16"}
    assert 0.2 < norms["fp16"] / norms["bf16"] < 5


def test_overflow_check_names_module_and_keeps_last_checkpoint(finished_runs, prepared64, tmp_path):
    finished_runs.copy(tmp_path, *ONE_EPOCH)
    good = (tmp_path / "ckpt" / "last.pt").read_bytes()
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    ckpt["state_dict"]["g_s.2.weight"] *= 1e30  # a decoder layer that blows up
    save_checkpoint(ckpt, tmp_path / "bad.pt")
    with pytest.raises(engine.TrainingStopped, match=r"step 0: first bad output in module 'g_s\.2'") as stopped:
        train_finetune_relu.main(common_args(prepared64, tmp_path, "--base_checkpoint", str(tmp_path / "bad.pt"),
                                             "--overflow_check", "true", "--train_scope", "all", "--overwrite", "true"))
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == good, "--overwrite replaces a run only at its first save"
    # a fresh run that stops before its first save wrote no checkpoint: the last.pt there is not its own
    assert "no checkpoint was written by this run" in str(stopped.value)
    assert "last good checkpoint" not in str(stopped.value) and "an earlier run's" in str(stopped.value)


@pytest.mark.quick
def test_stop_message_names_only_checkpoints_of_this_run(tmp_path):
    config = engine.StepConfig(last_checkpoint=tmp_path / "last.pt")
    state = engine.TrainState()
    assert engine.last_good_checkpoint(state, config) == "no checkpoint was written by this run"
    state.last_saved = tmp_path / "resumed_from.pt"
    assert engine.last_good_checkpoint(state, config) == f"last good checkpoint: {tmp_path / 'resumed_from.pt'}"


class _TouchOnLoad:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.quick
def test_pickled_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"state_dict": {}, "evil": _TouchOnLoad(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused to load"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.quick
def test_offline_pretrained_is_one_clear_line(prepared64, tmp_path, monkeypatch):
    import compressai.zoo.image as zoo_image

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(zoo_image, "load_state_dict_from_url", offline)
    argv = common_args(prepared64, tmp_path)
    argv[argv.index("--pretrained") + 1] = "true"
    with pytest.raises(UserError, match=r"--base_checkpoint PATH.*--pretrained false"):
        train_finetune_relu.main(argv)


def test_gdn_base_checkpoint_starts_a_relu_run(finished_runs, prepared64, tmp_path):
    base = finished_runs.get(*GDN_CONTROL) / "ckpt" / "last.pt"
    train_finetune_relu.main(common_args(prepared64, tmp_path, "--base_checkpoint", str(base), "--epochs", "1"))
    relu = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    gdn = torch.load(base, weights_only=True)["state_dict"]
    assert torch.equal(relu["g_s.0.weight"], gdn["g_s.0.weight"]), "frozen decoder keeps the base weights"
    assert not torch.equal(relu["g_a.0.weight"], gdn["g_a.0.weight"])


@pytest.mark.quick
@pytest.mark.parametrize("extra, message", [
    (["--local_fp32", "custom"], "--local_fp32_custom"),
    (["--sched", "onecycle", "--lr_warmup_steps", "5"], "onecycle"),
    (["--replace_parts", "none"], "--train_scope all"),
])
def test_bad_flag_combinations(prepared64, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train_finetune_relu.main(common_args(prepared64, tmp_path, *extra))


@pytest.mark.quick
def test_cli_errors_are_single_lines(tmp_path, capsys):
    """Parsing errors through the script's entry function; one error found after parsing through the real process
    (the subprocess smoke test of src.train_finetune_relu; the cases themselves: BAD_TRAINING_INPUT)."""
    with pytest.raises(SystemExit) as removed:
        run_cli(train_finetune_relu.main, ["--coco_dir", "x", "--amp_warmup_steps", "10"])
    err = capsys.readouterr().err
    assert removed.value.code == 2 and "--lr_warmup_steps" in err and "--local_fp32" in err
    for argv, needle in ((["--quality", "0"], "CompressAI's qualities are 1-8"),
                         (["--amp", "maybe"], "true or false")):
        with pytest.raises(SystemExit) as result:
            run_cli(train_finetune_relu.main, ["--coco_dir", str(tmp_path), *argv, "--pretrained", "false"])
        err = capsys.readouterr().err
        assert result.value.code == 2 and needle in err and "Traceback" not in err
    (tmp_path / "train").mkdir()
    empty = subprocess.run([sys.executable, "-m", "src.train_finetune_relu", "--coco_dir", str(tmp_path),
                            "--pretrained", "false"], capture_output=True, text=True, cwd=REPO)
    assert empty.returncode == 2 and "holds no images" in empty.stderr
    assert empty.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in empty.stderr


@pytest.mark.parametrize("scope, trained", [("all", True), ("replaced", False)])
def test_quantiles_train_with_aux_loss_only_when_entropy_model_trains(finished_runs, scope, trained):
    flags = ONE_EPOCH if scope == "replaced" else (*ONE_EPOCH, "--train_scope", scope)  # replaced: the default
    ckpt = torch.load(finished_runs.get(*flags) / "ckpt" / "last.pt", weights_only=True)
    initial = build_model(make_arch(quality=1, replace="relu")).entropy_bottleneck.quantiles
    changed = not torch.equal(ckpt["state_dict"]["entropy_bottleneck.quantiles"], initial.detach())
    assert changed == trained
    assert (ckpt["aux_optimizer"] is not None) == trained


@pytest.mark.parametrize("dtype, scaled", [("fp16", True), ("bf16", False)])
def test_grad_scaler_only_for_fp16(finished_runs, dtype, scaled):
    ckpt = torch.load(finished_runs.get(*ONE_EPOCH, *AMP, "--amp_dtype", dtype) / "ckpt" / "last.pt",
                      weights_only=True)
    scaler_state = ckpt["scaler"]
    assert ("scale" in scaler_state) == scaled


@pytest.mark.quick
@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_amp_dtype_auto_follows_native_bf16(capability, expected, monkeypatch):
    from src.precision import resolve_amp_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what emulation would claim
    assert resolve_amp_dtype(torch.device("cuda", 0), "auto")[0] == expected
    assert resolve_amp_dtype(torch.device("cuda", 0), "bf16")[0] == "bf16"  # an explicit choice is kept
    assert resolve_amp_dtype(torch.device("cpu"), "auto")[0] == "bf16"


@pytest.mark.quick
def test_local_fp32_survives_deepcopy_and_pickle():
    import copy
    import pickle

    torch.manual_seed(0)
    model = build_model(make_arch(quality=1, replace="relu")).eval()
    keys = set(model.state_dict())
    apply_local_fp32(model, "entropy")
    assert set(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.entropy_bottleneck.parameters():
            p.add_(0.5)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mine, theirs = model(x)["likelihoods"]["y"], twin(x)["likelihoods"]["y"]
        again = pickle.loads(pickle.dumps(model))(x)["likelihoods"]["y"]
    assert mine.dtype == theirs.dtype == again.dtype == torch.float32
    assert not torch.equal(mine, theirs), "the copy must run its own weights"
    assert torch.equal(mine, again)


def synthetic_recon(root, noise=(0.02, 0.05), count=2, size=64):
    """origin/ and one tag per noise level, with the pixels saved exactly as 8-bit PNGs."""
    torch.manual_seed(0)
    originals = (torch.rand(count, 3, size, size) * 255).round() / 255
    tags = {}
    for i, sigma in enumerate(noise):
        tags[f"epoch_{i + 1:03d}"] = ((originals + sigma * torch.randn_like(originals)).clamp(0, 1) * 255).round() / 255
    for tag, images in [("origin", originals), *tags.items()]:
        (root / tag).mkdir(parents=True)
        for index, image in enumerate(images):
            Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(root / tag / f"{index:05d}.png")
    return originals, tags


@pytest.mark.quick
def test_recon_report_sheet_and_captions(tmp_path):
    import numpy as np

    from src import recon as recon_report

    originals, tags = synthetic_recon(tmp_path / "recon")
    table = recon_report.main(["--recon_dir", str(tmp_path / "recon"), "--crop", "32"])
    sheet = Image.open(tmp_path / "recon" / "report.png")
    dpi, tile = recon_report.DPI, recon_report.TILE_INCHES
    assert sheet.size == (round(3 * tile * dpi), round((2 * 2 + 1.3) * tile * dpi))  # 3 columns, 2 images x 2 rows
    for tag, recons in tags.items():
        for index, metrics in enumerate(table["recon"][tag]):
            a = np.round(originals[index].numpy() * 255)
            b = np.round(recons[index].numpy() * 255)
            psnr = 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2))
            assert metrics["psnr"] == pytest.approx(psnr, abs=1e-3)
    means = [np.mean([m["psnr"] for m in table["recon"][t]]) for t in sorted(tags)]
    assert means[0] > means[1] + 3  # noise 0.02 vs 0.05


def drawn_sheet(monkeypatch):
    """Keep the figure the sheet saves, to read back what it shows."""
    from matplotlib.figure import Figure

    kept = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (kept.append(fig), save(fig, *a, **k))[1])
    return kept


@pytest.mark.quick
def test_recon_sheet_shows_rate_beside_quality_and_an_rd_plot(tmp_path, monkeypatch, capsys):
    import numpy as np

    from src import recon as recon_report

    synthetic_recon(tmp_path / "recon")
    # an epoch's val bpp (estimated, over the val set, with that set's PSNR) and per-image real bpp
    recon_report.write_rate(tmp_path / "recon", "epoch_001", 0.61, "estimated", "the val set (8 crops)", psnr=36.2)
    recon_report.write_rate(tmp_path / "recon", "epoch_002", 0.2, "real", "2 photos",
                            per_image={"00000.png": 0.15, "00001.png": 0.25})
    assert sorted(p.name for p in (tmp_path / "recon" / "epoch_001").iterdir()) == ["00000.png", "00001.png"]
    figures = drawn_sheet(monkeypatch)
    table = recon_report.main(["--recon_dir", str(tmp_path / "recon")])["recon"]
    assert [m["bpp"] for m in table["epoch_001"]] == [0.61, 0.61]
    assert [m["bpp"] for m in table["epoch_002"]] == [0.15, 0.25]
    texts = [t.get_text() for t in figures[0].findobj(lambda a: hasattr(a, "get_text"))]
    captions = [t for t in texts if t.startswith("epoch_")]
    assert any("0.610 bpp (val est.)" in t and "dB / MS-SSIM" in t for t in captions)
    assert any("0.150 bpp (real)" in t for t in captions) and any("0.250 bpp (real)" in t for t in captions)
    rd = figures[0].axes[-1]
    assert rd.get_xlabel().startswith("bpp") and rd.get_ylabel() == "PSNR [dB]"
    points = {(round(float(line.get_xdata()[0]), 4), round(float(line.get_ydata()[0]), 4)) for line in rd.lines}
    tile_psnr = np.mean([m["psnr"] for m in table["epoch_002"]])
    assert points == {(0.61, 36.2), (0.2, round(float(tile_psnr), 4))}  # rate and PSNR of the same images
    assert {t.get_text() for t in rd.texts} >= {"epoch_001", "epoch_002"}
    assert "mean bpp 0.2000" in capsys.readouterr().out


@pytest.mark.quick
def test_recon_sheet_without_rate_says_unknown(tmp_path, monkeypatch, capsys):
    from src import recon as recon_report

    synthetic_recon(tmp_path / "recon")
    figures = drawn_sheet(monkeypatch)
    recon_report.main(["--recon_dir", str(tmp_path / "recon")])
    texts = [t.get_text() for t in figures[0].findobj(lambda a: hasattr(a, "get_text"))]
    assert sum("bpp unknown" in t for t in texts) == 4 and not any(" bpp (" in t for t in texts)
    rd = figures[0].axes[-1]
    assert not rd.lines and any("rate unknown for every tag" in t.get_text() for t in rd.texts)
    assert capsys.readouterr().out.count("rate unknown") == 2
    (tmp_path / "recon" / "epoch_001.json").write_text('{"bpp": "lots"}')
    with pytest.raises(UserError, match="epoch_001.json is not a rate record"):
        recon_report.main(["--recon_dir", str(tmp_path / "recon")])


@pytest.mark.quick
def test_recon_report_bad_folders(tmp_path):
    from src import recon as recon_report

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no origin/"):
        recon_report.main(["--recon_dir", str(tmp_path / "empty")])
    synthetic_recon(tmp_path / "r1")
    (tmp_path / "r1" / "epoch_002" / "00001.png").unlink()
    with pytest.raises(UserError, match=r"epoch_002 does not match origin/ one to one \(missing: \['00001.png'\]"):
        recon_report.main(["--recon_dir", str(tmp_path / "r1")])
    synthetic_recon(tmp_path / "r2")
    (tmp_path / "r2" / "epoch_001" / "00000.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="00000.png cannot be read"):
        recon_report.main(["--recon_dir", str(tmp_path / "r2")])


@pytest.mark.quick
@pytest.mark.parametrize("make", [lambda: get_args_parser("x"), lambda: train_finetune_npu.get_npu_args_parser()])
@pytest.mark.parametrize("quality", ["0", "9", "three"])
def test_quality_outside_compressai_is_one_line(make, quality, capsys):
    """The recipe says 0〜8; CompressAI's zoo has 1-8: a 0 gets that said, not argparse's bare 'invalid choice'."""
    with pytest.raises(SystemExit) as exit_info:
        make().parse_args(["--coco_dir", "x", "--quality", quality])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert "--quality" in errors[0] and "CompressAI's qualities are 1-8" in errors[0]
    assert "invalid choice" not in errors[0]
    assert make().parse_args(["--coco_dir", "x", "--quality", "8"]).quality == 8


@pytest.mark.quick
@pytest.mark.parametrize("make", [lambda: get_args_parser("x"), lambda: train_finetune_npu.get_npu_args_parser()])
def test_help_shows_every_default_and_hides_removed_flags(make):
    parser = make()
    text = parser.format_help()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        assert action.option_strings[0] in text
        assert action.required or "%(default)" in formatter._get_help_string(action), action.option_strings
    assert "--amp_warmup_steps" not in text and "(default: auto)" in " ".join(text.split())


def test_wandb_dir_is_respected(prepared64, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_here"))
    train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1", "--wandb", "true"))
    assert list((tmp_path / "wandb_here").rglob("run-*.wandb"))
    assert not (tmp_path / "ckpt" / "wandb").exists()

