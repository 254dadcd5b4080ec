"""A hostile tester's findings in the codec, bundle and export paths (issue 33), each a test.

Crafted files, tables and manifests are refused in one line before anything
is allocated for them; no command replaces what a user has; a decoder crash
or a run-away allocation is seen from a subprocess. The fuzzer's findings
(``bench/fuzz_codec.py``) are replayed from ``tests/fixtures/codec_fuzz/``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import codec as codec_cli
from scripts import export_onnx
from src import eval as recipe_eval
from src.cli import UserError, run_cli
from src.codec.build import check_target
from src.codec.bundle import Codec, load_bundle, parse_manifest
from src.codec.format import FORMAT_VERSION, HEADER, MAGIC, Header, latent_size, pack, unpack
from src.codec.limits import MAX_PIXELS, padded_pixels
from src.codec.tables import TABLE_ERRORS, TABLE_KEYS, EntropyTables
from tests.conftest import one_line_error

pytestmark = pytest.mark.own_process  # loads OpenVINO through the codec fixtures (see run.sh)

REPO = Path(__file__).resolve().parents[1]
FUZZ_FIXTURES = REPO / "tests" / "fixtures" / "codec_fuzz"


# ---------------------------------------------------------------- helpers

def craft(table_hash: bytes, height: int, width: int, payload: bytes, channels: int = 192,
          latent=None) -> bytes:
    """A file with a valid header and CRC (trivial to compute, as an attacker would) around ``payload``."""
    lat_h, lat_w = latent or latent_size(height, width)
    head = HEADER.pack(MAGIC, FORMAT_VERSION, table_hash, height, width, channels, lat_h, lat_w,
                             len(payload), 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


@pytest.fixture(scope="module")
def bundle(codec_files):
    return load_bundle(codec_files["bundle"])


@pytest.fixture(scope="module")
def good_file(codec_files, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "b.npcf"
    codec_cli.main(["encode", "-b", str(codec_files["bundle"]), str(codec_files["root"] / "b.png"), "-o", str(path)])
    return path


def decode_refused(codec_files, data: bytes, tmp_path, capsys, needle: str = "") -> str:
    """Decode ``data`` with the CLI: one line, exit 2, no PNG written."""
    source, out = tmp_path / "crafted.npcf", tmp_path / "out.png"
    source.write_bytes(data)
    err = one_line_error(codec_cli.main, ["decode", "-b", str(codec_files["bundle"]), str(source), "-o", str(out)],
                         capsys)
    assert needle in err and not out.exists(), err
    return err


def copy_bundle(codec_files, tmp_path, name="copy") -> Path:
    folder = tmp_path / name
    shutil.copytree(codec_files["bundle"], folder)
    return folder


def resign_tables(folder: Path, tables: dict) -> None:
    """Replace a bundle's entropy tables and put their hash in the manifest, as a forger would."""
    np.savez(folder / "entropy.npz", **tables)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["entropy"]["sha256"] = EntropyTables.load(folder / "entropy.npz").digest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def tables_dict(bundle) -> dict:
    return {key: getattr(bundle.tables, key).copy() for key in TABLE_KEYS}


# ---------------------------------------------------------------- data loss

def prepared_crops(root: Path) -> Path:
    """A folder laid out as scripts.coco_prepare writes it: crops and a manifest.json of its own."""
    out = root / "prepared"
    (out / "train").mkdir(parents=True)
    (out / "val").mkdir()
    for index in range(3):
        Image.new("RGB", (16, 16), (index, 0, 0)).save(out / "train" / f"{index}.png")
    Image.new("RGB", (16, 16)).save(out / "val" / "0.png")
    (out / "manifest.json").write_text(json.dumps({"args": {"crop_size": 16}, "counts": {}, "complete": True}))
    return out


def test_bundle_never_replaces_a_folder_that_is_not_a_bundle(codec_files, tmp_path, capsys):
    target = prepared_crops(tmp_path)
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    argv = ["--ckpt", str(codec_files["ckpt"]), "--input_size", "64", "--image", str(codec_files["root"] / "a.png")]
    err = one_line_error(export_onnx.main, argv + ["--bundle", str(target)], capsys)
    assert "not a codec bundle: not overwriting" in err
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    # A real bundle with a file of the user's beside it is not replaced either; nor one whose graph was altered.
    mixed = copy_bundle(codec_files, tmp_path, "mixed")
    (mixed / "notes.txt").write_text("mine")
    assert "also holds other files" in one_line_error(export_onnx.main, argv + ["--bundle", str(mixed)], capsys)
    forged = copy_bundle(codec_files, tmp_path, "forged")
    (forged / "decoder.onnx").write_bytes(b"not a graph")
    assert "not a codec bundle" in one_line_error(export_onnx.main, argv + ["--bundle", str(forged)], capsys)
    assert (mixed / "notes.txt").read_text() == "mine" and (forged / "decoder.onnx").read_bytes() == b"not a graph"


def device_nodes(folder: Path) -> list:
    """Copies of /dev/full and /dev/null (character devices 1,7 and 1,3) and a FIFO, made in ``folder``.

    Never the system's own nodes: a regression would replace them (the tester's ``-o /dev/full`` as root turned
    the device into a PNG). Making a device node needs root (CAP_MKNOD); without it only the FIFO is tested.
    """
    nodes = []
    for name, minor in (("full", 7), ("null", 3)):
        try:
            os.mknod(folder / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
            nodes.append(folder / name)
        except PermissionError:
            pass
    os.mkfifo(folder / "pipe")
    os.mkfifo(folder / "pipe.png")
    return nodes + [folder / "pipe"]


def test_codec_output_that_is_a_device_or_a_fifo_is_refused_untouched(codec_files, good_file, tmp_path, capsys):
    bundle_dir, image = str(codec_files["bundle"]), str(codec_files["root"] / "a.png")
    cases = [(["encode", "-b", bundle_dir, image, "-o"], node) for node in device_nodes(tmp_path)]
    cases.append((["decode", "-b", bundle_dir, str(good_file), "-o"], tmp_path / "pipe.png"))
    for argv, out in cases:
        before = os.stat(out)
        err = one_line_error(codec_cli.main, argv + [str(out)], capsys)
        assert "device, FIFO or socket" in err, err
        after = os.stat(out)
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino


def test_codec_never_writes_over_its_input(codec_files, good_file, tmp_path, capsys):
    bundle_dir = str(codec_files["bundle"])
    photo = tmp_path / "photo.png"
    shutil.copyfile(codec_files["root"] / "a.png", photo)
    original = photo.read_bytes()
    assert "encode writes a codec file" in one_line_error(
        codec_cli.main, ["encode", "-b", bundle_dir, str(photo), "-o", str(photo)], capsys)
    assert photo.read_bytes() == original
    compressed = tmp_path / "x.npcf"
    shutil.copyfile(good_file, compressed)
    assert "name it with .png" in one_line_error(
        codec_cli.main, ["decode", "-b", bundle_dir, str(compressed), "-o", str(compressed)], capsys)
    # The same file under a name that passes the suffix check (a hard link): refused as the input.
    disguised = tmp_path / "x.png"
    os.link(compressed, disguised)
    assert "is the input" in one_line_error(
        codec_cli.main, ["decode", "-b", bundle_dir, str(disguised), "-o", str(disguised)], capsys)
    photo_copy = tmp_path / "photo.npcf"
    os.link(photo, photo_copy)
    assert "is the input" in one_line_error(
        codec_cli.main, ["encode", "-b", bundle_dir, str(photo), "-o", str(photo_copy)], capsys)
    assert compressed.read_bytes() == good_file.read_bytes() and photo.read_bytes() == original


def test_decode_writes_png_only(codec_files, good_file, tmp_path, capsys):
    for name in ("x.jpg", "x.webp", "x.JPEG"):
        err = one_line_error(codec_cli.main, ["decode", "-b", str(codec_files["bundle"]), str(good_file), "-o",
                                              str(tmp_path / name)], capsys)
        assert "writes a PNG" in err and not (tmp_path / name).exists()
    codec_cli.main(["decode", "-b", str(codec_files["bundle"]), str(good_file), "-o", str(tmp_path / "x.PNG")])
    assert Image.open(tmp_path / "x.PNG").format == "PNG"


# ---------------------------------------------------------------- crafted files: no crash, no allocation

def test_crafted_payloads_never_crash_the_decoder(codec_files, bundle, good_file, tmp_path):
    """Empty and 8-byte payloads made CompressAI's decoder read past the buffer (SIGSEGV): seen from a subprocess."""
    h = bundle.table_hash
    cases = {"empty": craft(h, 1, 1, b""), "eight": craft(h, 1, 1, b"\xff" * 8),
             "big_eight": craft(h, 1000, 1000, bytes(8))}
    for name, data in cases.items():
        (tmp_path / f"{name}.npcf").write_bytes(data)
    for fixture in sorted(FUZZ_FIXTURES.iterdir()):
        shutil.copyfile(fixture, tmp_path / f"fuzz-{fixture.name}")
    script = ("import sys; from pathlib import Path; from bench.fuzz_codec import Target; "
              "from src.cli import UserError; from scripts import codec as cli\n"
              "target = Target(Path(sys.argv[1]))\n"
              "for path in sys.argv[2:]:\n"
              "    if Path(path).name.startswith('fuzz-'):\n"
              "        target.run(Path(path).read_bytes()); print('handled', path); continue\n"
              "    try:\n"
              "        cli.main(['decode', '-b', sys.argv[1], path, '-o', path + '.png'])\n"
              "    except UserError as err:\n"
              "        print('refused', err)\n")
    inputs = sorted(str(p) for p in tmp_path.iterdir())
    result = subprocess.run([sys.executable, "-c", script, str(codec_files["bundle"]), *inputs], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    lines = result.stdout.strip().splitlines()
    assert sum(line.startswith("refused") for line in lines) == len(cases), lines
    assert sum(line.startswith("handled") for line in lines) == len(inputs) - len(cases)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("case", ["empty", "eight_bytes", "random", "all_ff", "all_zero", "too_long", "words"])
def test_payloads_the_encoder_cannot_have_written_are_refused(case, codec_files, bundle, good_file, tmp_path, capsys):
    header, payload = unpack(good_file.read_bytes(), "good")
    rng = np.random.default_rng(0)
    h, w, n = header.height, header.width, len(payload)
    data = {"empty": craft(bundle.table_hash, 1, 1, b""),
            "eight_bytes": craft(bundle.table_hash, 1, 1, bytes(8)),
            "random": craft(bundle.table_hash, h, w, rng.bytes(n)),
            "all_ff": craft(bundle.table_hash, h, w, b"\xff" * n),
            "all_zero": craft(bundle.table_hash, h, w, bytes(n)),
            "too_long": craft(bundle.table_hash, h, w, payload + rng.bytes(4 * 1024)),
            "words": craft(bundle.table_hash, h, w, payload[:-1])}[case]
    decode_refused(codec_files, data, tmp_path, capsys, "is corrupt")


def test_a_one_pixel_header_with_a_14_kb_payload_is_refused(codec_files, bundle, tmp_path, capsys):
    coder = bundle.coder()
    symbols = np.zeros((1, coder.channels, 4, 4), np.float32)
    payload = coder.encode(symbols)
    padded = payload + bytes(14 * 1024 - len(payload) // 4 * 4)
    decode_refused(codec_files, craft(bundle.table_hash, 1, 1, padded), tmp_path, capsys, "is corrupt")


def test_decoded_symbols_stay_within_the_encoders_bound(bundle):
    """A payload that codes a symbol beyond 2^20 (CompressAI's encoder takes it; ours refuses it) is refused."""
    coder = bundle.coder()
    symbols = np.zeros((1, coder.channels, 4, 4), np.float32)
    symbols[0, 3, 1, 2] = 2 ** 21
    payload = coder.encode(symbols)
    with pytest.raises(ValueError, match="beyond the bound"):
        coder.decode(payload, 4, 4)
    symbols[0, 3, 1, 2] = 2 ** 20 - 1
    assert np.array_equal(coder.decode(coder.encode(symbols), 4, 4), symbols)


@pytest.mark.parametrize("size", [(2048, 2048), (4096, 4096), (16384, 16384), (1048512, 1048512), (3000, 4000)])
def test_size_bombs_are_refused_before_allocation(size, codec_files, bundle, tmp_path, capsys):
    """A 59-byte file claiming 4096x4096 used 5.3 GB; the largest legal header asked numpy for 3 TiB."""
    height, width = size
    data = craft(bundle.table_hash, height, width, bytes(16))
    tracemalloc.start()
    err = decode_refused(codec_files, data, tmp_path, capsys)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "codes at most" in err or "payload takes" in err, err
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse a {len(data)}-byte file"


def test_the_payload_bounds_the_image_size(bundle):
    coder = bundle.coder()
    fewest, most = coder.payload_bounds(256, 256)
    assert fewest > 59 * 1000 and most > fewest
    small_fewest, small_most = coder.payload_bounds(4, 4)
    payload = coder.encode(np.zeros((1, coder.channels, 4, 4), np.float32))
    assert small_fewest <= len(payload) <= small_most


@pytest.mark.parametrize("size", [(4096, 2049), (6000, 6000), (1, 1048600)])
def test_encode_refuses_images_over_the_limit_before_decoding_them(size, codec_files, tmp_path, capsys, monkeypatch):
    width, height = size
    image = tmp_path / "big.png"
    Image.new("1", (width, height)).save(image)  # 1 bit per pixel: a few KB on disk

    def no_graph(*args, **kwargs):
        raise AssertionError("the encoder ran on an image over the limit")

    monkeypatch.setattr(Codec, "__init__", no_graph)
    err = one_line_error(codec_cli.main, ["encode", "-b", str(codec_files["bundle"]), str(image), "-o",
                                          str(tmp_path / "big.npcf")], capsys)
    assert f"codes at most {MAX_PIXELS} pixels" in err and not (tmp_path / "big.npcf").exists()


# ---------------------------------------------------------------- crafted bundles

@pytest.mark.parametrize("case, needle", [
    ("zero_lengths", "CDF lengths"),
    ("fewer_lengths", "cdf_lengths has shape"),
    ("huge_lengths", "CDF lengths"),
    ("all_zero_cdfs", "does not rise strictly"),
    ("nan_medians", "not finite"),
    ("one_dimensional", "CDF table has shape"),
])
def test_inconsistent_tables_are_refused_when_the_bundle_loads(case, needle, codec_files, bundle, tmp_path, capsys):
    tables = tables_dict(bundle)
    if case == "zero_lengths":
        tables["cdf_lengths"][:] = 0
    elif case == "fewer_lengths":
        tables["cdf_lengths"] = tables["cdf_lengths"][:5]
    elif case == "huge_lengths":
        tables["cdf_lengths"][7] = 10 ** 6
    elif case == "all_zero_cdfs":
        tables["cdfs"][:] = 0
    elif case == "nan_medians":
        tables["medians"][0] = np.nan
    else:
        tables["cdfs"] = tables["cdfs"][0]
    folder = copy_bundle(codec_files, tmp_path)
    resign_tables(folder, tables)
    good = tmp_path / "good.npcf"
    good.write_bytes(Codec(bundle, parts=("encoder",)).encode(np.zeros((8, 8, 3), np.uint8)))
    err = one_line_error(codec_cli.main, ["decode", "-b", str(folder), str(good), "-o", str(tmp_path / "x.png")],
                         capsys)
    assert needle in err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("case", ["no_entropy", "no_graphs", "null_entropy", "string_graphs", "null_graph",
                                  "deeply_nested", "not_utf8", "list"])
def test_malformed_manifests_are_one_line(case, codec_files, tmp_path, capsys):
    folder = copy_bundle(codec_files, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    text = None
    if case == "no_entropy":
        del manifest["entropy"]
    elif case == "no_graphs":
        del manifest["graphs"]
    elif case == "null_entropy":
        manifest["entropy"] = None
    elif case == "string_graphs":
        manifest["graphs"] = "encoder.onnx"
    elif case == "null_graph":
        manifest["graphs"]["decoder"] = None
    elif case == "deeply_nested":
        text = '{"format": "npu-codec-bundle", "version": 1, "x": ' + "[" * 100000 + "]" * 100000 + "}"
    elif case == "not_utf8":
        text = "\udcff"
    else:
        manifest = [manifest]
    raw = text.encode("utf-8", "surrogateescape") if text is not None else json.dumps(manifest).encode()
    (folder / "manifest.json").write_bytes(raw)
    err = one_line_error(codec_cli.main, ["audit", "-b", str(folder)], capsys)
    assert "manifest" in err


# ---------------------------------------------------------------- one image loader

def bomb_png(path: Path, side: int = 30000) -> Path:
    """A small PNG whose header claims ``side`` x ``side`` pixels (PIL refuses it as a decompression bomb)."""
    Image.new("1", (side, side)).save(path)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_decompression_bomb_is_one_line_in_encode_and_export(bomb, codec_files, tmp_path, capsys):
    err = one_line_error(codec_cli.main, ["encode", "-b", str(codec_files["bundle"]), str(bomb), "-o",
                                          str(tmp_path / "x.npcf")], capsys)
    assert "cannot be read as an image" in err or "codes at most" in err
    base = ["--ckpt", str(codec_files["ckpt"]), "--input_size", "64"]
    err = one_line_error(export_onnx.main, base + ["--part", "encoder", "--out", str(tmp_path / "e.onnx"),
                                                   "--image", str(bomb)], capsys)
    assert "cannot be decoded" in err and "--image" in err
    err = one_line_error(export_onnx.main, base + ["--bundle", str(tmp_path / "b"), "--image", str(bomb)], capsys)
    assert "cannot be read as an image" in err and not (tmp_path / "b").exists()


def test_decompression_bomb_in_int8_dir_is_skipped_by_name(bomb, codec_files, tmp_path, capsys, monkeypatch):
    calib = tmp_path / "calib"
    shutil.copytree(codec_files["root"] / "calib", calib)
    shutil.copyfile(bomb, calib / "9_bomb.png")
    seen = {}

    def fake_write_bundle(model, arch, out, verification, calibration, *args, **kwargs):
        seen["verification"], seen["calibration"] = list(verification), list(calibration)
        return {}

    monkeypatch.setattr(export_onnx, "write_bundle", fake_write_bundle)
    export_onnx.main(["--ckpt", str(codec_files["ckpt"]), "--bundle", str(tmp_path / "b"), "--int8", str(calib),
                      "--calib_count", "3"])
    assert f"skipping {calib / '9_bomb.png'}" in capsys.readouterr().out
    assert len(seen["calibration"]) == 3 and [p.name for p in seen["verification"]] == ["3.png", "4.png"]


def test_animated_gif_is_refused_not_cut_to_its_first_frame(codec_files, tmp_path, capsys):
    frames = [Image.new("RGB", (32, 32), (40 * k, 0, 0)) for k in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    err = one_line_error(codec_cli.main, ["encode", "-b", str(codec_files["bundle"]), str(tmp_path / "anim.gif"),
                                          "-o", str(tmp_path / "x.npcf")], capsys)
    assert "animated GIF of 3 frames" in err
    frames[0].save(tmp_path / "still.gif")
    codec_cli.main(["encode", "-b", str(codec_files["bundle"]), str(tmp_path / "still.gif"), "-o",
                    str(tmp_path / "still.npcf")])


# ---------------------------------------------------------------- where outputs go

def test_codec_output_paths_are_checked_before_any_work(codec_files, good_file, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    encode = ["encode", "-b", str(codec_files["bundle"]), str(codec_files["root"] / "a.png"), "-o"]
    decode = ["decode", "-b", str(codec_files["bundle"]), str(good_file), "-o"]
    for argv, out, needle in ((encode, tmp_path, "is a folder"), (decode, tmp_path / "folder.png", "is a folder"),
                              (encode, tmp_path / "a_file" / "x.npcf", "its folder cannot be created"),
                              (decode, tmp_path / "a_file" / "x.png", "its folder cannot be created")):
        assert needle in one_line_error(codec_cli.main, argv + [str(out)], capsys)
    assert (tmp_path / "a_file").read_text() == "x" and not any((tmp_path / "folder.png").iterdir())


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_a_write_that_fails_is_one_line_and_keeps_the_earlier_file(error, codec_files, good_file, tmp_path, capsys,
                                                                   monkeypatch):
    out = tmp_path / "x.png"
    out.write_bytes(b"earlier")

    def failing_fsync(fd):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    err = one_line_error(codec_cli.main, ["decode", "-b", str(codec_files["bundle"]), str(good_file), "-o",
                                          str(out)], capsys)
    assert os.strerror(error) in err and "earlier file is intact" in err
    assert out.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


# ---------------------------------------------------------------- export_onnx

def test_export_input_size_over_the_limit_is_one_line(codec_files, tmp_path, capsys):
    err = one_line_error(export_onnx.main, ["--ckpt", str(codec_files["ckpt"]), "--part", "encoder", "--out",
                                            str(tmp_path / "e.onnx"), "--input_size", "100000"], capsys)
    assert "--input_size 100000" in err and str(MAX_PIXELS) in err


def test_export_out_that_is_the_checkpoint_is_refused(codec_files, tmp_path, capsys):
    ckpt = tmp_path / "model.onnx"
    shutil.copyfile(codec_files["ckpt"], ckpt)
    err = one_line_error(export_onnx.main, ["--ckpt", str(ckpt), "--part", "encoder", "--out", str(ckpt),
                                            "--input_size", "64", "--image", str(codec_files["root"] / "a.png")],
                         capsys)
    assert "is the input" in err and ckpt.read_bytes() == codec_files["ckpt"].read_bytes()


@pytest.mark.parametrize("flag", ["--calib_count", "--int8_eval_count"])
def test_negative_counts_name_the_flag(flag, codec_files, tmp_path, capsys):
    err = one_line_error(export_onnx.main, ["--ckpt", str(codec_files["ckpt"]), "--bundle", str(tmp_path / "b"),
                                            "--int8", str(codec_files["root"] / "calib"), "--image",
                                            str(codec_files["root"] / "a.png"), flag, "-3"], capsys)
    assert f"{flag} -3 must be at least 1" in err


def test_bundle_build_folders_of_a_killed_export_are_removed(codec_files, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".b.build.{int(dead.stdout)}.abc123"
    (stale / "bundle").mkdir(parents=True)
    (stale / "bundle" / "encoder.onnx").write_bytes(bytes(1000))
    alive = tmp_path / f".b.build.{os.getpid()}.def456"
    alive.mkdir()
    export_onnx.main(["--ckpt", str(codec_files["ckpt"]), "--input_size", "64", "--bundle", str(tmp_path / "b"),
                      "--image", str(codec_files["root"] / "a.png")])
    assert not stale.exists() and alive.exists() and load_bundle(tmp_path / "b")
    check_target(tmp_path / "b")  # a verified bundle holding nothing else may be replaced by the next export


# ---------------------------------------------------------------- src.eval

@pytest.fixture(scope="module")
def eval_images(tmp_path_factory, codec_files):
    folder = tmp_path_factory.mktemp("eval_images")
    for name in ("a", "b"):
        Image.open(codec_files["root"] / f"{name}.png").resize((64, 64)).save(folder / f"{name}.png")
    return folder


def no_evaluation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("evaluated before its outputs were checked")

    monkeypatch.setattr(recipe_eval, "evaluate_checkpoint", fail)


@pytest.mark.parametrize("case, needle", [
    ("json_folder", "--json"),
    ("json_device", "device, FIFO or socket"),
    ("json_under_file", "its folder cannot be created"),
    ("plot_xyz", "a format matplotlib writes"),
    ("plot_folder", "is a folder"),
])
def test_eval_checks_its_outputs_before_evaluating(case, needle, codec_files, eval_images, tmp_path, capsys,
                                                   monkeypatch):
    (tmp_path / "a_file").write_text("x")
    device = device_nodes(tmp_path)[0]  # a copy of /dev/full, or a FIFO without root
    flags = {"json_folder": ["--json", str(tmp_path)], "json_device": ["--json", str(device)],
             "json_under_file": ["--json", str(tmp_path / "a_file" / "r.json")],
             "plot_xyz": ["--plot", str(tmp_path / "rd.xyz")], "plot_folder": ["--plot", str(tmp_path / "rd.png")]}[case]
    (tmp_path / "rd.png").mkdir()
    no_evaluation(monkeypatch)
    err = one_line_error(recipe_eval.main, ["--image_dir", str(eval_images), "--checkpoint",
                                            str(codec_files["ckpt"]), *flags], capsys)
    assert needle in err


def test_eval_json_is_atomic_and_a_full_disk_is_one_line(codec_files, eval_images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    argv = ["--image_dir", str(eval_images), "--checkpoint", str(codec_files["ckpt"]), "--json", str(out)]
    recipe_eval.main(argv)
    earlier = out.read_text()
    assert json.loads(earlier)["results"][0]["mean"]["bpp_real"] > 0

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as stop:
        run_cli(recipe_eval.main, argv)
    err = capsys.readouterr().err.split("\r")[-1].strip()  # after tqdm's progress bars
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --json"), err
    assert "No space left on device" in err and out.read_text() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_eval_skips_a_decompression_bomb_and_images_over_the_limit(bomb, codec_files, eval_images, tmp_path,
                                                                     capsys):
    folder = tmp_path / "images"
    shutil.copytree(eval_images, folder)
    shutil.copyfile(bomb, folder / "bomb.png")
    Image.new("1", (4096, 4096)).save(folder / "large.png")
    report = recipe_eval.main(["--image_dir", str(folder), "--checkpoint", str(codec_files["ckpt"])])
    out = capsys.readouterr().out
    assert [img["name"] for img in report["results"][0]["images"]] == ["a.png", "b.png"]
    assert "2 of 4 images skipped" in out and "bomb.png" in out and "large.png" in out


def test_a_curve_of_one_point_is_refused(codec_files, eval_images, capsys):
    err = one_line_error(recipe_eval.main, ["--image_dir", str(eval_images), "--curve",
                                            f"a={codec_files['ckpt']}"], capsys)
    assert "--curve a has one point" in err


# ---------------------------------------------------------------- properties (hypothesis)

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def decodes_or_refuses(decoder, data: bytes) -> None:
    """The property: an image of the header's size, or one ``UserError`` line; never anything else."""
    try:
        image = decoder.decode(data, "prop")
    except UserError as err:
        assert "\n" not in str(err)
        return
    header, _ = unpack(data, "prop")
    assert image.shape == (header.height, header.width, 3) and image.dtype == np.uint8


@pytest.fixture(scope="module")
def decoder(bundle):
    return Codec(bundle, parts=("decoder",))


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=400))
def test_any_bytes_decode_or_are_refused(decoder, data):
    decodes_or_refuses(decoder, data)


@PROPERTY_SETTINGS
@given(height=st.integers(0, 2 ** 32 - 1), width=st.integers(0, 2 ** 32 - 1), channels=st.integers(0, 2 ** 16 - 1),
       latent=st.one_of(st.none(), st.tuples(st.integers(0, 2 ** 16 - 1), st.integers(0, 2 ** 16 - 1))),
       payload=st.binary(max_size=2000))
def test_any_header_with_a_valid_crc_decodes_or_is_refused_in_bounded_memory(decoder, bundle, height, width, channels,
                                                                             latent, payload):
    if latent is None:  # mostly a consistent latent size, so that the checks after it are reached
        latent = tuple(min(side, 0xFFFF) for side in latent_size(height, width))
    data = craft(bundle.table_hash, height, width, payload, channels, latent)
    tracemalloc.start()
    decodes_or_refuses(decoder, data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20


@PROPERTY_SETTINGS
@given(h=st.integers(1, 3), w=st.integers(1, 3), seed=st.integers(0, 2 ** 32 - 1),
       scale=st.sampled_from([1, 5, 50, 2 ** 10, 2 ** 19]))
def test_the_checked_decoder_gives_compressai_symbols(bundle, h, w, seed, scale):
    coder = bundle.coder()
    rng = np.random.default_rng(seed)
    symbols = rng.integers(-scale, scale + 1, (1, coder.channels, h, w)).astype(np.float32)
    payload = coder.encode(symbols)
    assert np.array_equal(coder.decode(payload, h, w), symbols)
    fewest, most = coder.payload_bounds(h, w)
    assert fewest <= len(payload) <= most


@PROPERTY_SETTINGS
@given(height=st.integers(1, 2 ** 17), width=st.integers(1, 2 ** 17), payload=st.binary(max_size=64))
def test_headers_pack_and_unpack_to_themselves(bundle, height, width, payload):
    if padded_pixels(height, width) > MAX_PIXELS:
        with pytest.raises(UserError, match="codes at most"):
            unpack(craft(bundle.table_hash, height, width, payload), "prop")
        return
    header = Header(bundle.table_hash, height, width, 192, *latent_size(height, width), len(payload))
    assert unpack(pack(header, payload), "prop") == (header, payload)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=3000))
def test_any_manifest_bytes_are_a_manifest_or_one_line(data):
    try:
        parse_manifest(data, "manifest.json")
    except UserError as err:
        assert "\n" not in str(err)


@PROPERTY_SETTINGS
@given(cut=st.integers(0, 20000), flip=st.integers(0, 20000))
def test_any_damaged_tables_file_is_refused_or_valid(codec_files, cut, flip):
    raw = bytearray((codec_files["bundle"] / "entropy.npz").read_bytes())
    raw[flip % len(raw)] ^= 0x5A
    try:
        tables = EntropyTables.load(io.BytesIO(bytes(raw[: max(cut, 1)])))
        tables.validate("prop")
    except TABLE_ERRORS:
        return
    except UserError as err:
        assert "\n" not in str(err)


@PROPERTY_SETTINGS
@given(payload=st.binary(max_size=600))
def test_any_payload_is_refused_or_is_what_the_encoder_writes(bundle, payload):
    """Straight to the range decoder (past the length pre-check): every check of src.codec.rans is reached."""
    coder = bundle.coder()
    try:
        symbols = coder.decode(payload, 4, 4)
    except ValueError as err:
        assert str(err).startswith("its payload")
        return
    assert coder.encode(symbols) == payload
