"""The .npcf file format on its own (header, CRC, sizes): no bundle, no runtime, so it runs in the quick tier.

The same refusals through a real bundle and scripts.codec: tests/test_codec.py.
"""

import pytest

from src.codec import format as codec
from src.cli import UserError

pytestmark = pytest.mark.quick  # the edit loop's tier: ./run.sh test -m quick


def a_file(height=110, width=150, payload=b"range-coded symbols"):
    header = codec.Header(b"\x07" * codec.HASH_BYTES, height, width, 192, *codec.latent_size(height, width),
                          len(payload))
    return header, codec.pack(header, payload)


def test_a_packed_file_unpacks_to_its_header_and_payload():
    header, data = a_file()
    assert codec.unpack(data, "a.npcf") == (header, b"range-coded symbols")
    assert len(data) == codec.HEADER.size + len(b"range-coded symbols")
    assert codec.latent_size(110, 150) == (8, 12) and codec.latent_size(64, 65) == (4, 8)  # padded to 64, /16


def test_every_damaged_file_is_a_one_line_refusal_that_names_it():
    _, data = a_file()
    damaged = {
        "truncated": (data[:-5], "is truncated"),
        "header only": (data[:20], "is truncated: 20 bytes"),
        "empty": (b"", "is truncated: 0 bytes"),
        "extended": (data + b"\0", "longer than its header says"),
        "payload bit": (data[:-3] + bytes([data[-3] ^ 0x10]) + data[-2:], "is corrupt: its CRC-32"),
        "size bit": (data[:21] + bytes([data[21] ^ 1]) + data[22:], "is corrupt"),
        "magic": (b"JFIF" + data[4:], "not a file of this codec"),
        "version": (data[:4] + b"\x07" + data[5:], "format version 7"),
    }
    for case, (content, needle) in damaged.items():
        with pytest.raises(UserError, match=needle) as refused:
            codec.unpack(content, "a.npcf")
        assert str(refused.value).startswith("a.npcf ") and "\n" not in str(refused.value), case


def test_a_header_whose_latent_does_not_fit_its_image_is_refused():
    header = codec.Header(b"\x07" * codec.HASH_BYTES, 110, 150, 192, 3, 3, 4)
    with pytest.raises(UserError, match="latent 3x3 does not fit a 150x110 image"):
        codec.unpack(codec.pack(header, b"abcd"), "a.npcf")
