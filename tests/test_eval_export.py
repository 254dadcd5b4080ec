import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts import export_onnx
from src import eval as recipe_eval
from src.cli import UserError
from src.codec.roundtrip import bitstream_roundtrip
from src.images import center_crop_tensor, load_rgb
from src.quant import onnx_export
from src.quant.ptq import SymbolCodec, mean_points, pad_to, run, session
from src.quant.symbols import SymbolDecoder, SymbolEncoder, symbol_graphs
from tests.conftest import GDN_CONTROL, ONE_EPOCH, photo_paths

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(finished_runs):
    """The last.pt of a 1-epoch run of each kind: CompressAI's GDN model, ReLU encoder, NPU blocks."""
    return {"gdn": finished_runs.get(*GDN_CONTROL) / "ckpt" / "last.pt",
            "relu": finished_runs.get(*ONE_EPOCH) / "ckpt" / "last.pt",
            "npu": finished_runs.get(*ONE_EPOCH, script="npu") / "ckpt" / "last.pt"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two real photos of odd sizes (not multiples of 64), one portrait."""
    folder = tmp_path_factory.mktemp("photos")
    paths = photo_paths()
    load_rgb(paths[0]).resize((250, 180)).save(folder / "a.png")
    load_rgb(paths[1]).resize((170, 230)).save(folder / "b.png")
    return folder


def test_eval_agrees_with_compressai_eval_model(checkpoints, photos, tmp_path):
    ours = recipe_eval.main(["--image_dir", str(photos), "--checkpoint", str(checkpoints["gdn"]),
                             "--json", str(tmp_path / "r.json")])["results"][0]["mean"]
    result = subprocess.run([sys.executable, "-m", "compressai.utils.eval_model", "checkpoint", str(photos),
                             "-a", "bmshj2018-factorized", "-p", str(checkpoints["gdn"])],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-1500:]
    theirs = json.loads(result.stdout[result.stdout.index("{"):])["results"]
    assert abs(ours["psnr"] - theirs["psnr-rgb"][0]) < 0.01
    assert abs(ours["bpp_real"] / theirs["bpp"][0] - 1) < 0.005
    assert abs(ours["ms_ssim"] - theirs["ms-ssim-rgb"][0]) < 1e-3


def test_eval_side_by_side_json_and_plot(checkpoints, photos, tmp_path, capsys):
    recipe_eval.main(["--image_dir", str(photos), "--checkpoint", str(checkpoints["gdn"]), str(checkpoints["relu"]),
                      str(checkpoints["npu"]), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "rd.png")])
    report = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["arch"]["replace"] for r in report] == ["none", "relu", "npu"]
    for r in report:
        assert set(r["mean"]) == {"psnr", "ms_ssim", "bpp_est", "bpp_real", "enc_s", "dec_s"}
        assert [img["name"] for img in r["images"]] == ["a.png", "b.png"]
        assert abs(r["mean"]["bpp_real"] / r["mean"]["bpp_est"] - 1) < 0.05
    assert (tmp_path / "rd.png").stat().st_size > 1000
    assert "dPSNR" in capsys.readouterr().out


def test_eval_bad_inputs(checkpoints, photos, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "foreign.pt")
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other_model.pt")
    cases = [
        (["--image_dir", str(photos), "--checkpoint", str(tmp_path / "other_model.pt")],
         "neither a checkpoint of this project .* nor a CompressAI bmshj2018-factorized"),
        (["--image_dir", str(tmp_path / "empty"), "--checkpoint", str(checkpoints["gdn"])], "holds no images"),
        (["--image_dir", str(photos), "--checkpoint", str(tmp_path / "missing.pt")], "not found"),
        (["--image_dir", str(photos), "--checkpoint", str(tmp_path / "other.pt")], "not a readable"),
        (["--image_dir", str(photos), "--checkpoint", str(tmp_path / "foreign.pt")], "no model weights"),
    ]
    for argv, needle in cases:
        with pytest.raises(UserError, match=needle):
            recipe_eval.main(argv)


def test_export_npu_encoder_decoder_pass_npu_audit(checkpoints, tmp_path):
    for part in ("encoder", "decoder"):
        report = export_onnx.main(["--ckpt", str(checkpoints["npu"]), "--part", part, "--out",
                                   str(tmp_path / f"{part}.onnx"), "--input_size", "64", "--dynamic"])
        assert len(report["errors"]) == 2 and all(max(e.values()) < 1e-3 for e in report["errors"].values())
        assert not set(report["ops"]) & set(onnx_export.NPU_FORBIDDEN_OPS)


def test_export_full_and_replace_parts_rules(checkpoints, tmp_path):
    report = export_onnx.main(["--ckpt", str(checkpoints["gdn"]), "--part", "full", "--out",
                               str(tmp_path / "full.onnx"), "--input_size", "64"])
    assert "Sqrt" in report["ops"] or "Pow" in report["ops"]  # GDN is still there
    relu = export_onnx.main(["--ckpt", str(checkpoints["gdn"]), "--part", "encoder", "--out",
                             str(tmp_path / "enc.onnx"), "--input_size", "64", "--replace_parts", "encoder"])
    assert "Relu" in relu["ops"] and "Sqrt" not in relu["ops"]
    with pytest.raises(UserError, match="contradicts"):
        export_onnx.main(["--ckpt", str(checkpoints["relu"]), "--part", "encoder", "--out",
                          str(tmp_path / "x.onnx"), "--replace_parts", "all"])


def test_eval_reports_checkpoint_without_entropy_tables(checkpoints, photos, tmp_path, capsys):
    ckpt = torch.load(checkpoints["relu"], weights_only=True)
    for key in [k for k in ckpt["state_dict"] if k.endswith(("_quantized_cdf", "_offset", "_cdf_length"))]:
        ckpt["state_dict"][key] = torch.zeros(0, dtype=ckpt["state_dict"][key].dtype)
    torch.save(ckpt, tmp_path / "stale.pt")
    result = recipe_eval.main(["--image_dir", str(photos), "--checkpoint", str(tmp_path / "stale.pt")])["results"][0]
    assert result["entropy_updated_in_checkpoint"] is False
    assert "saved without model.update()" in capsys.readouterr().out
    assert result["mean"]["bpp_real"] > 0


def test_int8_export_gdn_against_npu(checkpoints, prepared64, tmp_path):
    """Both quantise and round-trip; only the NPU graph is free of float-only ops."""
    reports = {}
    for name in ("gdn", "npu"):
        report = export_onnx.main(["--ckpt", str(checkpoints[name]), "--part", "decoder", "--out",
                                   str(tmp_path / f"{name}.onnx"), "--input_size", "64",
                                   "--int8", str(prepared64 / "train"), "--calib_count", "8"])["int8"]
        assert Path(report["int8_path"]).exists() and report["calib_images"] == 8
        assert report["method"] == "ptq" and abs(report["psnr_drop"]) < 0.5 and abs(report["rate_change"]) < 0.1
        assert report["bpp_fp32"] > 0 and report["rate_change"] == pytest.approx(report["bpp_int8"] / report["bpp_fp32"] - 1)
        # The kept INT8 decoder (symbols in) really is quantised: close to the FP32 decoder on a held-out crop's
        # symbols, but not equal.
        image = center_crop_tensor(sorted((prepared64 / "val").iterdir())[0], (64, 64))
        model, _, _ = recipe_eval.load_model(checkpoints[name], torch.device("cpu"))
        with torch.no_grad():
            symbols = SymbolEncoder(model, rounded=True)(image)
            fp32 = SymbolDecoder(model)(symbols).numpy()
        int8 = run(session(Path(report["int8_path"])), symbols.numpy())
        assert 0 < np.abs(int8 - fp32).max() and np.abs(int8 - fp32).mean() < 0.05
        ops = onnx_export.op_histogram(Path(report["int8_path"]))
        assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
        reports[name] = report
    assert reports["npu"]["float_only_ops"] == []
    assert set(reports["gdn"]["float_only_ops"]) & {"Sqrt", "Pow", "Div"}
    with pytest.raises(UserError, match="--part encoder or --part decoder"):
        export_onnx.main(["--ckpt", str(checkpoints["npu"]), "--part", "full", "--out", str(tmp_path / "f.onnx"),
                          "--int8", str(prepared64 / "train")])


def test_export_plain_compressai_state_dict_with_relu_replacement(photos, tmp_path):
    from compressai.zoo import bmshj2018_factorized

    torch.save(bmshj2018_factorized(quality=1).state_dict(), tmp_path / "zoo.pth.tar")
    image = str(next(photos.glob("*.png")))
    report = export_onnx.main(["--ckpt", str(tmp_path / "zoo.pth.tar"), "--part", "encoder", "--out",
                               str(tmp_path / "enc.onnx"), "--input_size", "64", "--replace_parts", "encoder",
                               "--image", image])
    assert "Relu" in report["ops"] and "Sqrt" not in report["ops"]
    zoo = recipe_eval.main(["--image_dir", str(photos), "--checkpoint", str(tmp_path / "zoo.pth.tar")])["results"][0]
    assert zoo["arch"] is None and zoo["mean"]["bpp_real"] > 0, "a zoo state dict is evaluated as it is (GDN)"
    with pytest.raises(UserError, match="pass --image"):
        export_onnx.main(["--ckpt", str(tmp_path / "zoo.pth.tar"), "--part", "encoder", "--out",
                          str(tmp_path / "e2.onnx"), "--input_size", "64"])


def test_int8_round_trip_is_measured_on_images_it_was_not_calibrated_on(checkpoints, prepared64, tmp_path,
                                                                       monkeypatch):

    seen = {"calib": [], "eval": []}
    calibrate, roundtrip_points = onnx_export.calibrate, onnx_export.roundtrip_points

    def spy_calibrate(fp32, images, folder):
        seen["calib"] += list(images)
        return calibrate(fp32, images, folder)

    def spy_roundtrip(codec, images):
        seen["eval"] += [image.numpy() for image in images]
        return roundtrip_points(codec, images)

    monkeypatch.setattr(onnx_export, "calibrate", spy_calibrate)
    monkeypatch.setattr(onnx_export, "roundtrip_points", spy_roundtrip)
    argv = ["--ckpt", str(checkpoints["npu"]), "--part", "encoder", "--out", str(tmp_path / "e.onnx"),
            "--input_size", "64", "--int8", str(prepared64 / "train"), "--calib_count", "8"]
    report = export_onnx.main(argv)["int8"]
    assert (report["calib_images"], report["eval_images"]) == (8, 16) and "after the 8 calibration" in report["eval_from"]
    assert len(seen["calib"]) == 8 and len(seen["eval"]) == 2 * 16  # FP32 and INT8 round trips
    assert not any(np.array_equal(c, e) for c in seen["calib"] for e in seen["eval"])
    held_out = export_onnx.main(argv + ["--int8_eval_dir", str(prepared64 / "val")])["int8"]
    assert held_out["eval_images"] == 2 and held_out["eval_from"] == str(prepared64 / "val")


def test_symbol_codec_round_trip_matches_the_pytorch_codec(checkpoints, photos, tmp_path):
    """The INT8 report's codec (symbol graphs + CompressAI's range coder) is src.eval's codec when the graphs are
    FP32."""
    model, _, _ = recipe_eval.load_model(checkpoints["npu"], torch.device("cpu"))
    x = torch.from_numpy(np.asarray(load_rgb(photos / "a.png"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    graphs = symbol_graphs(model, torch.from_numpy(pad_to(x.numpy(), 64)), tmp_path)
    codec = SymbolCodec(graphs["encoder"], graphs["decoder"], model.entropy_bottleneck)
    ours, reference = bitstream_roundtrip(codec, x), bitstream_roundtrip(model, x)
    assert abs(ours["bits"] - reference["bits"]) <= 0.01 * reference["bits"]
    assert (ours["x_hat"] - reference["x_hat"].clamp(0, 1)).abs().max() < 1e-3
    assert mean_points(codec, [x], 64)[0]["bpp"] == pytest.approx(ours["bits"] / (180 * 250))


def test_demo_sheet_decodes_every_stage(checkpoints, photos, tmp_path):
    """Each column: src.eval's PSNR and real bpp on that photo (the sheet's rate is passed in, not invented)."""
    from scripts.demo import decode_stages, photo_bpp
    from src import recon

    stages = {"gdn": checkpoints["gdn"], "relu": checkpoints["relu"], "npu": checkpoints["npu"]}
    report = recipe_eval.main(["--image_dir", str(photos), "--checkpoint", *map(str, stages.values())])
    bpp = photo_bpp(report, stages, photos / "a.png")
    sheet = decode_stages(stages, photos / "a.png", tmp_path / "stages", bpp)
    origin = Image.open(tmp_path / "stages" / "origin" / "00000.png")
    assert origin.size == (250, 180)  # the whole photo, coded as src.eval codes it
    table = recon.write_report([tmp_path / "stages"], tmp_path / "again.png")["stages"]
    for index, (name, result) in enumerate(zip(stages, report["results"]), start=1):
        tag = f"{index}_{name}"
        assert Image.open(tmp_path / "stages" / tag / "00000.png").size == origin.size
        measured = next(img for img in result["images"] if img["name"] == "a.png")
        assert table[tag][0]["bpp"] == measured["bpp_real"] > 0
        assert table[tag][0]["psnr"] == pytest.approx(measured["psnr"], abs=1e-6)
        assert recon.read_rate(tmp_path / "stages", tag)["kind"] == "real"
    assert Image.open(sheet).size[0] > 4 * 150
