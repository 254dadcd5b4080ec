"""Faults of the tools around training (issue 23): 16-bit PNGs, coco_prepare, export_onnx, src.recon.

Each test is a case a tester broke: the bad input must end in one line and a
non-zero exit, and nothing the user had may be lost or silently mixed.
"""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from src.images import load_rgb

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


def test_16bit_rgb_png_agrees_with_the_same_gray_file(tmp_path):
    gray = np.asarray(load_rgb(write_png16(tmp_path / "gray16.png", SAMPLES_16)))
    as_rgb = np.asarray(load_rgb(write_png16(tmp_path / "rgb16.png", np.stack([SAMPLES_16] * 3, axis=-1))))
    assert np.array_equal(gray, as_rgb)
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    assert np.array_equal(np.asarray(load_rgb(write_png16(tmp_path / "colour16.png", colour))),
                          (colour >> 8).astype(np.uint8))
