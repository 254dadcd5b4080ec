import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import coco_prepare
from src.cli import UserError

REPO = Path(__file__).resolve().parents[1]


def run(coco, out, *extra):
    return coco_prepare.main(["--coco_dir", str(coco), "--out_dir", str(out), "--crop_size", "64",
                              "--workers", "1", *extra])


def test_crops_are_rgb_png_of_exact_size_and_stable_names(coco_root, tmp_path):
    manifest = run(coco_root, tmp_path, "--crops_per_image", "2")
    train = sorted((tmp_path / "train").glob("*.png"))
    val = sorted((tmp_path / "val").glob("*.png"))
    assert len(train) == 12 and len(val) == 2
    for path in train + val:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
    assert manifest["counts"]["written"] == 8
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["crops"]["val2017/000000000001.jpg"] == ["val/000000000001_00.png"]


def test_val_crop_is_the_center_crop(coco_root, tmp_path):
    run(coco_root, tmp_path)
    src = Image.open(coco_root / "val2017" / "000000000001.jpg").convert("RGB")
    w, h = src.size
    expected = np.asarray(src.crop(((w - 64) // 2, (h - 64) // 2, (w - 64) // 2 + 64, (h - 64) // 2 + 64)))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "val" / "000000000001_00.png")), expected)


def test_deterministic_across_worker_counts_and_idempotent(coco_root, tmp_path):
    run(coco_root, tmp_path / "a", "--crops_per_image", "3")
    coco_prepare.main(["--coco_dir", str(coco_root), "--out_dir", str(tmp_path / "b"), "--crop_size", "64",
                       "--crops_per_image", "3", "--workers", "2"])
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert files_a == files_b
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    crops = sorted((tmp_path / "a" / "train").glob("*.png"))
    assert len({c.read_bytes() for c in crops}) == len(crops), "random crops of one photo should differ"
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.png")}
    again = run(coco_root, tmp_path / "a", "--crops_per_image", "3")
    assert again["counts"]["existing"] == 8 and "written" not in again["counts"]
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.png")}
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_other_seed_gives_other_train_crops(coco_root, tmp_path):
    run(coco_root, tmp_path / "s0")
    run(coco_root, tmp_path / "s1", "--seed", "1")
    name = "train/000000000001_00.png"
    assert (tmp_path / "s0" / name).read_bytes() != (tmp_path / "s1" / name).read_bytes()
    val = sorted(p.name for p in (tmp_path / "s0" / "val").iterdir())
    assert val and val == sorted(p.name for p in (tmp_path / "s1" / "val").iterdir())
    assert all((tmp_path / "s0" / "val" / n).read_bytes() == (tmp_path / "s1" / "val" / n).read_bytes() for n in val), \
        "val crops are center crops: the seed must not move them"


def make_odd_images(folder: Path):
    """Every kind of file real COCO (and real users) throw at the script."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(folder / "a_gray.jpg")
    Image.fromarray(rgb).convert("CMYK").save(folder / "b_cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "c_rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "d_palette.png")
    Image.fromarray((rng.integers(0, 65535, (80, 96))).astype(np.uint16)).save(folder / "e_16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(folder / "f_exif.jpg", exif=exif)
    Image.fromarray(rgb[:40, :40]).save(folder / "g_small.jpg")
    good = (folder / "a_gray.jpg").read_bytes()
    (folder / "h_truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "i_empty.jpg").write_bytes(b"")
    (folder / "j_text.jpg").write_text("not an image")


def test_modes_small_and_broken_files(tmp_path):
    make_odd_images(tmp_path / "coco" / "train2017")
    manifest = run(tmp_path / "coco", tmp_path / "out", "--include_val", "false")
    counts = manifest["counts"]
    assert counts["written"] == 6
    assert counts["skipped_too_small"] == 1
    assert manifest["skipped"]["train2017/h_truncated.jpg"] == "corrupt"
    assert manifest["skipped"]["train2017/i_empty.jpg"] == "empty"
    assert manifest["skipped"]["train2017/j_text.jpg"] == "unreadable"
    for path in (tmp_path / "out" / "train").glob("*.png"):
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (64, 64)
    gray = np.asarray(Image.open(tmp_path / "out" / "train" / "a_gray_00.png"))
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_exif_rotation_is_applied(tmp_path):
    folder = tmp_path / "coco" / "train2017"
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (200, 70), (10, 200, 30)).save(folder / "rot.jpg", exif=exif)
    run(tmp_path / "coco", tmp_path / "out", "--include_val", "false")  # 70 px wide after rotation: fits 64
    assert (tmp_path / "out" / "train" / "rot_00.png").exists()


def test_upscale_small_flag(tmp_path):
    folder = tmp_path / "coco" / "train2017"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 50), (1, 2, 3)).save(folder / "small.png")
    with pytest.raises(UserError, match="no crops written"):
        run(tmp_path / "coco", tmp_path / "out", "--include_val", "false")
    manifest = run(tmp_path / "coco", tmp_path / "out", "--include_val", "false", "--upscale_small", "true")
    assert manifest["counts"]["written"] == 1


def test_max_images(coco_root, tmp_path):
    manifest = run(coco_root, tmp_path, "--max_images", "2")
    assert manifest["counts"]["crops_train"] == 2 and manifest["counts"]["crops_val"] == 2


@pytest.mark.parametrize("layout, needle", [("missing", "does not exist"), ("no_train", "train2017")])
def test_bad_coco_dir_is_one_line_and_nonzero(tmp_path, layout, needle):
    coco = tmp_path / "coco"
    if layout == "no_train":
        coco.mkdir()
    result = subprocess.run([sys.executable, "-m", "scripts.coco_prepare", "--coco_dir", str(coco),
                             "--out_dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and needle in result.stderr


def test_reusing_an_out_dir_with_other_crop_arguments_is_refused(coco_root, tmp_path):
    run(coco_root, tmp_path, "--max_images", "1")
    run(coco_root, tmp_path, "--max_images", "2")  # the same arguments complete it
    for extra, needle in ((["--crop_size", "96"], "--crop_size 64 -> 96"), (["--seed", "5"], "--seed 0 -> 5")):
        with pytest.raises(UserError, match=needle):
            run(coco_root, tmp_path, *extra)  # argparse keeps the last --crop_size
