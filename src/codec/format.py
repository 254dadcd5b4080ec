"""The codec's file format: a 43-byte header, then the rANS payload (little-endian)::

    offset size  field
         0    4  magic b"NPCF"
         4    1  format version (1)
         5   16  first 16 bytes of the sha256 of the entropy tables (``EntropyTables.digest``)
        21    4  image height H (uint32)
        25    4  image width W (uint32)
        29    2  latent channels M (uint16)
        31    2  latent height h (uint16) = ceil(H / 64) * 4
        33    2  latent width w (uint16)  = ceil(W / 64) * 4
        35    4  payload length in bytes (uint32)
        39    4  CRC-32 of bytes 0..38 and of the payload
        43    -  payload: CompressAI's rANS string of the M*h*w symbols (channel-major)

The image is padded to a multiple of 64 (zeros around it, centred, as
``src.eval`` and CompressAI's eval pad it), coded, and cropped back. The
payload is exactly the string ``EntropyBottleneck.compress`` writes, so a
file is the bits ``src.eval`` counts plus the header. ``unpack`` refuses a
header that is not self-consistent or claims more than ``MAX_PIXELS``, before
anything is allocated for the image.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Tuple

from src.cli import UserError
from src.codec.limits import MAX_PIXELS, padded_pixels

MAGIC = b"NPCF"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sB16sIIHHHII")
HASH_BYTES = 16
PAD_MULTIPLE = 64
LATENT_STRIDE = 16


@dataclass(frozen=True)
class Header:
    table_hash: bytes
    height: int
    width: int
    channels: int
    latent_h: int
    latent_w: int
    payload_len: int


def latent_size(height: int, width: int) -> Tuple[int, int]:
    """The latent (h, w) of an image padded to ``PAD_MULTIPLE``."""
    def side(n: int) -> int:
        return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE // LATENT_STRIDE

    return side(height), side(width)


def pack(header: Header, payload: bytes) -> bytes:
    head = HEADER.pack(MAGIC, FORMAT_VERSION, header.table_hash, header.height, header.width, header.channels,
                       header.latent_h, header.latent_w, len(payload), 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def unpack(data: bytes, source: str) -> Tuple[Header, bytes]:
    """Header and payload of a file; one-line refusals for anything that is not an intact file of this format."""
    if not data.startswith(MAGIC) and not (len(data) < len(MAGIC) and MAGIC.startswith(data)):
        raise UserError(f"{source} is not a file of this codec (magic {data[:4]!r}, expected {MAGIC!r})")
    if len(data) < HEADER.size:
        raise UserError(f"{source} is truncated: {len(data)} bytes, the header alone is {HEADER.size}")
    magic, version, table_hash, height, width, channels, lat_h, lat_w, payload_len, crc = HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise UserError(f"{source} has format version {version}; this decoder reads version {FORMAT_VERSION}")
    if len(data) != HEADER.size + payload_len:
        what = "truncated" if len(data) < HEADER.size + payload_len else "longer than its header says"
        raise UserError(f"{source} is {what}: {len(data)} bytes, header + payload = {HEADER.size + payload_len}")
    payload = data[HEADER.size:]
    if zlib.crc32(payload, zlib.crc32(data[: HEADER.size - 4])) != crc:
        raise UserError(f"{source} is corrupt: its CRC-32 does not match its contents")
    header = Header(table_hash, height, width, channels, lat_h, lat_w, payload_len)
    if height == 0 or width == 0 or (lat_h, lat_w) != latent_size(height, width):
        raise UserError(f"{source} is corrupt: latent {lat_h}x{lat_w} does not fit a {width}x{height} image")
    check_pixels(height, width, source)
    return header, payload


def check_pixels(height: int, width: int, source: str) -> None:
    """Refuse an image larger than ``MAX_PIXELS`` once padded to 64, before anything is allocated for it."""
    padded = padded_pixels(height, width, PAD_MULTIPLE)
    if padded > MAX_PIXELS:
        raise UserError(f"{source} is {width}x{height} ({padded} pixels padded to {PAD_MULTIPLE}): this codec "
                        f"codes at most {MAX_PIXELS} pixels (docs/codec.md, 'Limits'); split the image")
