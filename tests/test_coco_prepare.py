import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import coco_prepare
from src.cli import UserError
from tests.conftest import one_line_error

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


@pytest.mark.quick
def test_bad_coco_dir_is_one_line_and_nonzero(tmp_path, capsys):
    """A missing folder through the entry function; one without train2017/ as the user runs it (the subprocess
    smoke test of scripts.coco_prepare)."""
    coco = tmp_path / "coco"
    argv = ["--coco_dir", str(coco), "--out_dir", str(tmp_path / "out")]
    assert "does not exist" in one_line_error(coco_prepare.main, argv, capsys)
    coco.mkdir()
    result = subprocess.run([sys.executable, "-m", "scripts.coco_prepare", *argv], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "train2017" in result.stderr


@pytest.mark.quick
def test_reusing_an_out_dir_with_other_crop_arguments_is_refused(coco_root, tmp_path):
    run(coco_root, tmp_path, "--max_images", "1")
    run(coco_root, tmp_path, "--max_images", "2")  # the same arguments complete it
    for extra, needle in ((["--crop_size", "96"], "--crop_size 64 -> 96"), (["--seed", "5"], "--seed 0 -> 5")):
        with pytest.raises(UserError, match=needle):
            run(coco_root, tmp_path, *extra)  # argparse keeps the last --crop_size


def test_interrupted_first_run_keeps_its_parameters(coco_root, tmp_path, monkeypatch):
    """The manifest's parameters land before the first crop: a rerun with others is refused, not mixed in."""
    done = []
    real = coco_prepare.process_image

    def interrupted_after_two(job):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(job)
        return real(job)

    monkeypatch.setattr(coco_prepare, "process_image", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(coco_root, tmp_path / "out")
    monkeypatch.undo()
    assert len(list((tmp_path / "out" / "train").glob("*.png"))) == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["args"]["crop_size"] == 64
    with pytest.raises(UserError, match=r"--crop_size 64 -> 96.*delete .* to start over"):
        run(coco_root, tmp_path / "out", "--crop_size", "96")
    completed = run(coco_root, tmp_path / "out")
    assert completed["counts"]["existing"] == 2 and completed["counts"]["written"] == 6
    run(coco_root, tmp_path / "fresh")
    for crop in (tmp_path / "fresh").rglob("*.png"):
        assert crop.read_bytes() == (tmp_path / "out" / crop.relative_to(tmp_path / "fresh")).read_bytes()


def test_crops_without_a_manifest_are_not_added_to(coco_root, tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (96, 96)).save(tmp_path / "train" / "old_00.png")
    with pytest.raises(UserError, match="no manifest.json"):
        run(coco_root, tmp_path)


def test_sources_with_one_stem_get_distinct_crops(tmp_path):
    folder = tmp_path / "coco" / "train2017"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["photo.jpg", "photo.png", "photo.JPG", "photo.jpg.png", "other.png"]
    for name in names:
        pixels = rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    manifest = run(tmp_path / "coco", tmp_path / "out", "--include_val", "false")
    assert manifest["counts"]["written"] == 5 and manifest["counts"]["crops_train"] == 5
    crops = {name: manifest["crops"][f"train2017/{name}"] for name in names}
    assert len({c for names_ in crops.values() for c in names_}) == 5
    assert len(list((tmp_path / "out" / "train").glob("*.png"))) == 5
    assert crops["other.png"] == ["train/other_00.png"], "a stem no other source shares keeps its name"
    assert crops["photo.JPG"] == ["train/photo.JPG_00.png"]
    again = run(tmp_path / "coco", tmp_path / "out", "--include_val", "false", "--max_images", "1")
    assert again["counts"] == {"existing": 1, "crops_train": 1}, "names do not depend on --max_images"


def test_non_utf8_file_names_are_cropped_and_reported(tmp_path):
    folder = tmp_path / "coco" / "train2017"
    folder.mkdir(parents=True)
    good, bad = os.fsdecode(b"caf\xe9.jpg"), os.fsdecode(b"\xff\xfe.jpg")
    Image.new("RGB", (80, 80), (9, 99, 199)).save(folder / good, format="JPEG")
    (folder / bad).write_bytes(b"not an image")
    result = subprocess.run([sys.executable, "-m", "scripts.coco_prepare", "--coco_dir", str(tmp_path / "coco"),
                             "--out_dir", str(tmp_path / "out"), "--crop_size", "64", "--include_val", "false",
                             "--workers", "1"], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    crop = os.fsdecode(b"caf\xe9_00.png")
    assert (tmp_path / "out" / "train" / crop).is_file()
    assert "skipped train2017/\\xff\\xfe.jpg: unreadable" in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["crops"][f"train2017/{good}"] == [f"train/{crop}"]


def test_full_disk_is_one_line_and_the_rerun_completes(coco_root, tmp_path, monkeypatch):
    real_save = Image.Image.save
    written = []

    def save_on_a_disk_that_fills(self, fp, *args, **kwargs):
        if len(written) == 3:
            fp.write(b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_on_a_disk_that_fills)
    with pytest.raises(UserError, match=r"disk is full .*MiB free.*rerun with the same arguments"):
        run(coco_root, tmp_path)
    monkeypatch.undo()
    assert not list(tmp_path.rglob("*.tmp")), "no half-written crop is left behind"
    assert json.loads((tmp_path / "manifest.json").read_text())["args"]["crop_size"] == 64
    assert run(coco_root, tmp_path)["counts"] == {"existing": 3, "written": 5, "crops_train": 6, "crops_val": 2}


def test_full_disk_before_the_first_crop_is_one_line(coco_root, tmp_path, monkeypatch):
    def no_space(path, write, durable=True):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(coco_prepare, "write_atomic", no_space)
    with pytest.raises(UserError, match=r"could not write .*manifest.json: the disk is full"):
        run(coco_root, tmp_path)
    assert not list((tmp_path / "train").glob("*.png"))


@pytest.mark.quick
@pytest.mark.parametrize("case, needle", [
    ("file", "is a file, not a folder"),
    ("under_a_file", "cannot be created"),
    ("crop_100", "--crop_size 100 is not a multiple of 16"),
    ("crop_0", "--crop_size 0 is not a multiple of 16"),
])
def test_bad_out_dir_and_crop_size_are_one_line(case, needle, coco_root, tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = {"file": tmp_path / "a_file", "under_a_file": tmp_path / "a_file" / "out"}.get(case, tmp_path / "out")
    size = {"crop_100": "100", "crop_0": "0"}.get(case, "64")
    with pytest.raises(UserError, match=needle):
        run(coco_root, out, "--crop_size", size)
    assert (tmp_path / "a_file").read_text() == "x"


def test_fifos_and_broken_links_are_counted_and_named(coco_root, tmp_path, capsys):
    """Entries with an image's name that are not files are skipped, counted and named, like unreadable images."""
    coco = tmp_path / "coco"
    shutil.copytree(coco_root, coco)
    train = coco / "train2017"
    os.mkfifo(train / "pipe.jpg")
    (train / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (train / "loop_a.jpg").symlink_to(train / "loop_b.jpg")
    (train / "loop_b.jpg").symlink_to(train / "loop_a.jpg")
    manifest = run(coco, tmp_path / "out")
    counts, skipped = manifest["counts"], manifest["skipped"]
    assert counts["skipped_not_a_file"] == 1 and counts["skipped_dangling_link"] == 1
    assert counts["skipped_link_loop"] == 2
    assert skipped["train2017/pipe.jpg"] == "not_a_file" and skipped["train2017/dangling.jpg"] == "dangling_link"
    out = capsys.readouterr().out
    assert "skipped train2017/pipe.jpg: not_a_file" in out and "skipped train2017/loop_a.jpg: link_loop" in out
