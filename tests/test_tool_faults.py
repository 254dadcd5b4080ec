"""Faults of the tools around training (issue 23): 16-bit PNGs, coco_prepare, export_onnx, src.recon.

Each test is a case a tester broke: the bad input must end in one line and a
non-zero exit, and nothing the user had may be lost or silently mixed.
"""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from torch.onnx import _constants as onnx_constants

from scripts import export_onnx
from src.cli import UserError
from src.images import load_rgb
from tests.conftest import photo_paths

# 16-bit gray samples and the 8-bit value each must become: the high byte (v >> 8).
SAMPLES_16 = np.array([[0, 1, 128, 192, 255, 256], [257, 384, 257 * 128, 200 * 257 + 3, 65280, 65535]],
                      dtype=np.uint16)


def write_png16(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit PNG (gray for (H, W), RGB for (H, W, 3)) written byte by byte, so every Pillow reads one file."""
    height, width = samples.shape[:2]
    color_type = 0 if samples.ndim == 2 else 2
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.quick
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_gray_png_is_scaled_by_its_bit_depth_in_every_pillow_mode(mode, tmp_path, monkeypatch):
    """Pillow versions open 16-bit gray PNGs as I;16 or I: the pixels must not depend on which."""
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), (mode, "I;16B"))
    path = write_png16(tmp_path / "gray16.png", SAMPLES_16)
    with Image.open(path) as img:
        assert img.mode == mode
    got = np.asarray(load_rgb(path))
    assert got.shape == (*SAMPLES_16.shape, 3) and got.dtype == np.uint8
    assert np.array_equal(got[..., 0], (SAMPLES_16 >> 8).astype(np.uint8))
    assert np.array_equal(got[..., 0], got[..., 2])
    # 0-255 in a 16-bit file is under 1/256 of full scale: black, as any viewer shows it, in every mode.
    dark = write_png16(tmp_path / "dark16.png", np.arange(256, dtype=np.uint16).reshape(16, 16))
    assert np.asarray(load_rgb(dark)).max() == 0
    # 8-bit values widened the standard way (v * 257) come back exactly.
    widened = write_png16(tmp_path / "wide16.png", np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    assert np.array_equal(np.asarray(load_rgb(widened))[..., 1], np.arange(256, dtype=np.uint8).reshape(16, 16))


@pytest.mark.quick
def test_16bit_rgb_png_agrees_with_the_same_gray_file(tmp_path):
    gray = np.asarray(load_rgb(write_png16(tmp_path / "gray16.png", SAMPLES_16)))
    as_rgb = np.asarray(load_rgb(write_png16(tmp_path / "rgb16.png", np.stack([SAMPLES_16] * 3, axis=-1))))
    assert np.array_equal(gray, as_rgb)
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    assert np.array_equal(np.asarray(load_rgb(write_png16(tmp_path / "colour16.png", colour))),
                          (colour >> 8).astype(np.uint8))


# ---------------------------------------------------------------- export_onnx

@pytest.fixture(scope="module")
def zoo_export(tmp_path_factory):
    """A plain CompressAI state dict (GDN, quality 1) and a real photo to verify its exports on."""
    from compressai.zoo import bmshj2018_factorized

    root = tmp_path_factory.mktemp("zoo_export")
    torch.manual_seed(0)
    model = bmshj2018_factorized(quality=1)
    model.update(force=True)  # entropy tables, for the INT8 round trip
    torch.save(model.state_dict(), root / "zoo.pth.tar")
    load_rgb(photo_paths()[0]).resize((96, 96)).save(root / "photo.png")
    return root


def export(zoo_export, out, *extra):
    return export_onnx.main(["--ckpt", str(zoo_export / "zoo.pth.tar"), "--part", "encoder", "--out", str(out),
                             "--input_size", "64", "--image", str(zoo_export / "photo.png"), *extra])


def test_an_export_that_fails_verification_never_reaches_out(zoo_export, tmp_path, monkeypatch):
    out = tmp_path / "enc.onnx"
    with pytest.raises(UserError, match=r"opset 7 export does not verify \(onnxruntime: .*Max node.*not written"):
        export(zoo_export, out, "--opset", "7")  # onnxruntime cannot run GDN's broadcasting Max at opset 7
    assert list(tmp_path.iterdir()) == [], "no unverified graph at --out, no temp file beside it"
    export(zoo_export, out)
    good = out.read_bytes()
    with pytest.raises(UserError, match=r"opset 7 export does not verify .*left as it was"):
        export(zoo_export, out, "--opset", "7")
    monkeypatch.setattr(export_onnx, "MAX_ABS_ERROR", -1.0)
    with pytest.raises(UserError, match="export mismatch"):
        export(zoo_export, out)
    assert out.read_bytes() == good, "a failed export does not destroy the good graph already at --out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.onnx"]


# The TorchScript exporter's opsets in this torch (7..20 in torch 2.14).
OPSETS = (onnx_constants.ONNX_MIN_OPSET,
          getattr(onnx_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", onnx_constants.ONNX_MAX_OPSET))


@pytest.mark.quick
@pytest.mark.parametrize("case, needle", [
    ("input_0", "--input_size 0 must be a positive multiple of the model's stride 16"),
    ("opset_low", rf"--opset {OPSETS[0] - 1} is outside {OPSETS[0]}\.\.{OPSETS[1]}, the opsets the TorchScript"),
    ("opset_high", rf"--opset {OPSETS[1] + 1} is outside {OPSETS[0]}\.\.{OPSETS[1]}"),
    ("out_dir", "is a folder"),
    ("out_under_a_file", "cannot be created"),
    ("int8_opset_12", "--int8 needs --opset 13 or later"),
])
def test_bad_export_arguments_are_one_line(case, needle, zoo_export, tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = {"out_dir": tmp_path, "out_under_a_file": tmp_path / "a_file" / "enc.onnx"}.get(case, tmp_path / "e.onnx")
    extra = {"input_0": ["--input_size", "0"], "opset_low": ["--opset", str(OPSETS[0] - 1)],
             "opset_high": ["--opset", str(OPSETS[1] + 1)], "int8_opset_12": ["--opset", "12", "--int8", str(tmp_path)]}
    argv = ["--ckpt", str(zoo_export / "zoo.pth.tar"), "--part", "encoder", "--out", str(out),
            "--image", str(zoo_export / "photo.png"), "--input_size", "64", *extra.get(case, [])]
    with pytest.raises(UserError, match=needle):
        export_onnx.main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_int8_skips_unreadable_calibration_images_by_name(zoo_export, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    photo = Image.open(zoo_export / "photo.png")
    for index in range(5):
        photo.rotate(90 * index).save(calib / f"{index}_good.png")
    (calib / "0_empty.png").write_bytes(b"")
    (calib / "1_text.jpg").write_text("not an image")
    (calib / "4_truncated.png").write_bytes((calib / "0_good.png").read_bytes()[:200])
    report = export(zoo_export, tmp_path / "enc.onnx", "--int8", str(calib), "--calib_count", "5")["int8"]
    out = capsys.readouterr().out
    for bad in ("0_empty.png", "1_text.jpg", "4_truncated.png"):
        assert out.count(f"warning: skipping {calib / bad}: cannot be decoded") == 1
    # 0_empty .. 2_good calibrate (two of the five unreadable); 3_good, 4_good, 4_truncated are the round trip
    assert (report["calib_images"], report["eval_images"]) == (3, 2)
    for bad in calib.glob("*_good.png"):
        bad.write_bytes(b"")
    with pytest.raises(UserError, match=r"none of the 5 calibration images .* could be decoded"):
        export(zoo_export, tmp_path / "enc.onnx", "--int8", str(calib), "--calib_count", "5")


# ---------------------------------------------------------------- src.recon

def recon_folder(root: Path, origin_size: int = 64, tag_size: int = 64) -> Path:
    """origin/ and one tag of two PNGs each, the tag at its own size."""
    rng = np.random.default_rng(0)
    for tag, size in (("origin", origin_size), ("epoch_001", tag_size)):
        (root / tag).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / tag / f"{index:05d}.png")
    return root


@pytest.mark.quick
def test_recon_tag_of_another_size_than_origin_is_one_line(tmp_path):
    from src import recon

    recon_folder(tmp_path / "recon", origin_size=64, tag_size=96)
    with pytest.raises(UserError, match=r"epoch_001/00000.png is 96x96 but origin/00000.png is 64x64"):
        recon.main(["--recon_dir", str(tmp_path / "recon")])
    assert not (tmp_path / "recon" / "report.png").exists()


@pytest.mark.quick
@pytest.mark.parametrize("case, needle", [
    ("folder", "is a folder"),
    ("under_a_file", "cannot be created"),
    ("unknown_format", "matplotlib cannot write '.xyz'"),
])
def test_recon_out_that_cannot_be_written_is_one_line(case, needle, tmp_path):
    from src import recon

    folder = recon_folder(tmp_path / "recon")
    (tmp_path / "a_file").write_text("x")
    out = {"folder": tmp_path, "under_a_file": tmp_path / "a_file" / "sheet.png",
           "unknown_format": tmp_path / "sheet.xyz"}[case]
    with pytest.raises(UserError, match=needle):
        recon.main(["--recon_dir", str(folder), "--out", str(out)])
    assert (tmp_path / "a_file").read_text() == "x" and not (tmp_path / "sheet.xyz").exists()
