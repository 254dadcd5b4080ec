"""CompressAI's objective (--distortion mse), best_loss.pt, RD curves and Bjøntegaard deltas."""

import json
import math

import numpy as np
import pytest
import torch
from compressai.losses import RateDistortionLoss

from src import eval as recipe_eval
from src import train_finetune_relu
from src.cli import UserError
from src.losses import ZOO_LAMBDA_BPP, ZOO_LMBDA, RecipeLoss
from src.rd_curves import bd_deltas, bd_markdown, compare_curves, msssim_db, parse_curve


def tiny_pair():
    """x = 0.5 everywhere; x_hat off by 0.1 on 6 of 48 values, so MSE = 6 * 0.01 / 48 = 0.00125."""
    x = torch.full((1, 3, 4, 4), 0.5)
    x_hat = x.clone()
    x_hat[0, 0, 0, :] += 0.1
    x_hat[0, 1, 1, :2] -= 0.1
    likelihoods = {"y": torch.full((1, 2, 2, 2), 0.25), "z": torch.full((1, 1, 1, 1), 0.5)}
    return x, x_hat, likelihoods


@pytest.mark.quick
def test_mse_distortion_closed_form():
    x, x_hat, likelihoods = tiny_pair()
    mse = 6 * 0.1 ** 2 / 48
    bpp = (8 * 2 + 1 * 1) / 16  # -log2(0.25) = 2 bits for 8 values, -log2(0.5) = 1 bit, over 4x4 pixels
    parts = RecipeLoss(loss_type="rd", lambda_bpp=7.0, distortion="mse")({"x_hat": x_hat, "likelihoods": likelihoods}, x)
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert parts["distortion"].item() == pytest.approx(255 ** 2 * mse, rel=1e-5)
    assert parts["bpp"].item() == pytest.approx(bpp, rel=1e-6)
    assert parts["total"].item() == pytest.approx(255 ** 2 * mse + 7.0 * bpp, rel=1e-5)
    assert "msssim" not in parts  # CompressAI's objective computes no MS-SSIM
    recon = RecipeLoss(loss_type="recon", lambda_bpp=7.0, distortion="mse")({"x_hat": x_hat,
                                                                            "likelihoods": likelihoods}, x)
    assert recon["total"].item() == pytest.approx(255 ** 2 * mse, rel=1e-5)


@pytest.mark.quick
@pytest.mark.parametrize("quality", [1, 4, 8])
def test_mse_rd_loss_is_compressai_loss_over_its_lmbda(quality):
    torch.manual_seed(quality)
    x = torch.rand(2, 3, 16, 16)
    output = {"x_hat": x + 0.03 * torch.randn_like(x),
              "likelihoods": {"y": torch.rand(2, 8, 4, 4).clamp_min(1e-3), "z": torch.rand(2, 8, 1, 1)}}
    ours = RecipeLoss(loss_type="rd", lambda_bpp=ZOO_LAMBDA_BPP[quality], distortion="mse")(output, x)["total"]
    theirs = RateDistortionLoss(lmbda=ZOO_LMBDA[quality])(output, x)["loss"]
    torch.testing.assert_close(ours * ZOO_LMBDA[quality], theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.quick
def test_l1_msssim_distortion_keeps_its_parts():
    x, x_hat, likelihoods = tiny_pair()
    x, x_hat = x.repeat(1, 1, 13, 13), x_hat.repeat(1, 1, 13, 13)  # 52 px: the smallest MS-SSIM window fits
    parts = RecipeLoss(0.25, "rd", 0.5)({"x_hat": x_hat, "likelihoods": likelihoods}, x)
    assert parts["l1"].item() == pytest.approx(6 * 0.1 / 48, rel=1e-5)
    assert parts["total"].item() == pytest.approx(0.25 * parts["l1"].item() + 0.75 * parts["1-msssim"].item()
                                                  + 0.5 * (17 / 52 ** 2), rel=1e-5)


def test_mse_training_logs_mse_and_keeps_best_loss(prepared64, tmp_path, capsys):
    argv = ["--coco_dir", str(prepared64), "--quality", "1", "--pretrained", "false", "--epochs", "3",
            "--max_steps_per_epoch", "2", "--batch_size", "2", "--num_workers", "0", "--save_dir",
            str(tmp_path / "ckpt"), "--recon_dir", str(tmp_path / "recon"), "--recon_count", "1", "--log_every", "1",
            "--replace_parts", "none", "--train_scope", "all", "--loss_type", "rd", "--distortion", "mse",
            "--lambda_bpp", "150", "--lr", "1e-3", "--wandb", "true", "--amp", "false"]
    summary = train_finetune_relu.main(argv)
    out = capsys.readouterr().out
    assert "| MSE " in out and "1-MSSSIM" not in out
    val_losses = [e["val"]["loss"] for e in summary["epochs"]]
    best_epoch = int(np.argmin(val_losses)) + 1
    best = torch.load(tmp_path / "ckpt" / "best_loss.pt", weights_only=True)
    assert best["epoch"] == best_epoch and best["best_loss"] == pytest.approx(min(val_losses))
    assert summary["best_loss"] == pytest.approx(min(val_losses))
    last = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["best_loss"] == pytest.approx(min(val_losses))
    data = next((tmp_path / "ckpt" / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"train/rd/mse" in data and b"train/rd/1-msssim" not in data


def power_curve(rates, a=30.0, b=8.0):
    """PSNR = a + b*log10(rate): a straight line in the log-rate domain the BD integrals use."""
    return [{"bpp": r, "psnr": a + b * math.log10(r), "ms_ssim_db": 10 + 5 * math.log10(r)} for r in rates]


@pytest.mark.quick
@pytest.mark.parametrize("factor", [1.1, 0.8, 1.5])
def test_bd_rate_of_scaled_rates_is_factor_minus_one(factor):
    rates = [0.1, 0.25, 0.5, 1.0, 2.0]
    anchor = power_curve(rates)
    test = [dict(p, bpp=p["bpp"] * factor) for p in anchor]  # same quality at factor x the bits
    for axis, slope in (("psnr", 8.0), ("ms_ssim_db", 5.0)):
        result = bd_deltas(anchor, test, axis)
        assert result["bd_rate"] == pytest.approx(100 * (factor - 1), abs=1e-6)
        # the test curve is the anchor shifted right by log10(factor): slope * log10(factor) dB lower
        assert result["bd_quality"] == pytest.approx(-slope * math.log10(factor), abs=1e-6)


@pytest.mark.quick
def test_bd_needs_four_points_and_overlap():
    few = bd_deltas(power_curve([0.1, 0.5, 1.0]), power_curve([0.1, 0.5, 1.0, 2.0]), "psnr")
    assert few["bd_rate"] is None and few["bd_quality"] is None and "at least 4 points" in few["notes"][0]
    apart = bd_deltas(power_curve([0.1, 0.2, 0.3, 0.4]), power_curve([1.0, 2.0, 3.0, 4.0]), "psnr")
    assert apart["bd_rate"] is None and apart["bd_quality"] is None
    assert any("do not overlap" in n for n in apart["notes"])
    gdn = power_curve([0.1, 0.2, 0.4, 0.8])
    deltas = compare_curves({"gdn": gdn, "npu": [dict(p, bpp=1.2 * p["bpp"]) for p in gdn]})
    assert list(deltas) == ["npu"] and deltas["npu"]["psnr"]["bd_rate"] == pytest.approx(20.0, abs=1e-6)
    assert "| npu | +20.00 % | " in bd_markdown(deltas)


@pytest.mark.quick
def test_msssim_db_and_curve_parsing():
    assert msssim_db(0.99) == pytest.approx(20.0)
    assert parse_curve("gdn=a.pt, b.pt") == ("gdn", ["a.pt", "b.pt"])
    for bad in ("gdn", "=a.pt", "gdn="):
        with pytest.raises(ValueError, match="NAME=CKPT"):
            parse_curve(bad)


def test_eval_curves_cli(prepared64, tmp_path, capsys):
    runs = []
    for index, lam in enumerate(("50", "400")):
        run = tmp_path / f"run{index}"
        train_finetune_relu.main(["--coco_dir", str(prepared64), "--quality", "1", "--pretrained", "false",
                                  "--epochs", "1", "--max_steps_per_epoch", "1", "--batch_size", "2",
                                  "--num_workers", "0", "--save_dir", str(run), "--recon_dir", str(run / "recon"),
                                  "--recon_count", "1", "--loss_type", "rd", "--distortion", "mse",
                                  "--lambda_bpp", lam, "--amp", "false"])
        runs.append(run)
    photos = prepared64 / "val"
    report = recipe_eval.main(["--image_dir", str(photos), "--curve", f"a={runs[0]},{runs[1]}",
                               "--curve", f"b={runs[1]}/best_loss.pt,{runs[0]}/last.pt",
                               "--json", str(tmp_path / "rd.json"), "--plot", str(tmp_path / "rd.png")])
    out = capsys.readouterr().out
    assert "needs at least 4 points per curve (a has 2, b has 2)" in out
    saved = json.loads((tmp_path / "rd.json").read_text())
    assert saved["curves"]["anchor"] == "a" and list(saved["curves"]["points"]) == ["a", "b"]
    assert saved["curves"]["points"]["a"][0]["checkpoint"].endswith("best_loss.pt")  # a folder means best_loss.pt
    assert saved["curves"]["bd"]["b"]["psnr"]["bd_rate"] is None
    assert len(report["results"]) == 3  # run1/best_loss.pt is evaluated once for both curves
    assert (tmp_path / "rd.png").stat().st_size > 1000
    for argv, needle in ((["--image_dir", str(photos)], "give --checkpoint"),
                         (["--image_dir", str(photos), "--curve", "x"], "NAME=CKPT"),
                         (["--image_dir", str(photos), "--curve", f"a={tmp_path}"], "without best_loss.pt"),
                         (["--image_dir", str(photos), "--curve", f"a={runs[0]}", "--curve", f"a={runs[1]}"],
                          "given twice")):
        with pytest.raises(UserError, match=needle):
            recipe_eval.main(argv)


@pytest.mark.quick
def test_rd_study_plans_equal_budget_runs(tmp_path, capsys):
    from bench import rd_study

    rd_study.main(["--coco_dir", str(tmp_path / "coco"), "--eval_dir", str(tmp_path / "kodak"), "--work_dir",
                   str(tmp_path / "study"), "--qualities", "1", "2", "3", "4", "--dry_run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    bases = [line for line in lines if f"--save_dir {tmp_path / 'study' / 'base'}" in line]
    tunes = [line for line in lines if "--base_checkpoint" in line]
    assert len(bases) == 4 and len(tunes) == 4 * len(rd_study.GDN_SWAP_VARIANTS)
    for q in (1, 2, 3, 4):  # CompressAI's trade-off per quality, the clip on the same scale, one budget for all
        runs = [line for line in tunes if f"--quality {q} " in line]
        assert len(runs) == 5 and all(f"--lambda_bpp {ZOO_LAMBDA_BPP[q]:.6g} --max_grad_norm" in r for r in runs)
        assert len({r.split("--epochs ")[1].split()[0] for r in runs}) == 1
        assert all(f"--base_checkpoint {tmp_path / 'study' / 'base' / f'q{q}' / 'best_loss.pt'}" in r for r in runs)
    assert "--init_from_gdn true" in [r for r in tunes if "npu_all_gdnfit" in r][0]
    assert "--curve gdn_control=" in lines[-1] and "--curve gdn_base=" in lines[-1]
    with pytest.raises(UserError, match="bmshj2018-factorized-prior-2-"):
        rd_study.main(["--coco_dir", "c", "--eval_dir", "k", "--work_dir", str(tmp_path / "zoo"), "--zoo_dir",
                       str(tmp_path), "--qualities", "2", "--dry_run"])


@pytest.mark.quick
def test_non_monotonic_curve_is_flagged():
    rates = [0.1, 0.2, 0.4, 0.8]
    bent = power_curve(rates)
    bent[-1]["psnr"] = bent[-2]["psnr"] - 0.1  # quality falls at the highest rate
    notes = bd_deltas(power_curve(rates), bent, "psnr", "gdn", "relu")["notes"]
    assert any("relu is not monotonic" in n for n in notes)
    assert not bd_deltas(power_curve(rates), power_curve(rates), "psnr")["notes"]
