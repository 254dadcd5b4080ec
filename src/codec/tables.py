"""The factorized prior's tables and the range coder that reads them (``compressai.ans``).

The prior is factorized and static: every latent element of channel c is
coded with CDF c, whatever the image. So the tables are the whole contract
between an encoder and a decoder; any encoder and any decoder graph of the
same model (FP32 or INT8) exchange files.
"""

from __future__ import annotations

import hashlib
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Tuple, Union

import numpy as np
from compressai.ans import RansEncoder

from src.cli import UserError
from src.codec.format import HEADER, LATENT_STRIDE
from src.codec.latents import LATENT_LIMIT
from src.codec.limits import MAX_PIXELS
from src.codec.rans import MAX_BYPASS_NIBBLES, PRECISION, decode_with_indexes

TABLE_KEYS = ("cdfs", "cdf_lengths", "offsets", "medians")
TABLE_DTYPES = {"cdfs": np.int32, "cdf_lengths": np.int32, "offsets": np.int32, "medians": np.float32}
# What reading a damaged entropy.npz raises (numpy's npy/zip parsing, zlib, a missing key, an unsafe dtype; the
# npy header is a Python literal that numpy tokenizes: a cut one raises tokenize's TokenError).
TABLE_ERRORS = (OSError, KeyError, ValueError, TypeError, EOFError, OverflowError, SyntaxError, zlib.error,
                zipfile.BadZipFile, NotImplementedError, tokenize.TokenError)


SYMBOL_LIMIT = LATENT_LIMIT  # the encoder refuses |symbol| >= 2^20 (check_codable): so does the decoder
MAX_TABLE_LENGTH = 1 << 16
MAX_TABLE_BYTES = 64 << 20  # real tables: 192 x 23 int32 = 17 KB


@dataclass(frozen=True)
class EntropyTables:
    """The factorized prior, as the range coder reads it (CompressAI's ``EntropyBottleneck`` buffers)."""

    cdfs: np.ndarray         # (M, L) int32, each row padded after its cdf_length
    cdf_lengths: np.ndarray  # (M,) int32
    offsets: np.ndarray      # (M,) int32: the symbol of each CDF's first entry
    medians: np.ndarray      # (M,) float32: what the graphs subtract / add around the symbols

    @property
    def channels(self) -> int:
        return int(self.cdfs.shape[0])

    def digest(self) -> str:
        """sha256 (hex) of the four arrays: name, dtype, shape and little-endian bytes of each, in a fixed order."""
        sha = hashlib.sha256()
        for key in TABLE_KEYS:
            array = np.ascontiguousarray(getattr(self, key), dtype=np.dtype(TABLE_DTYPES[key]).newbyteorder("<"))
            sha.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
            sha.update(array.tobytes())
        return sha.hexdigest()

    def save(self, path: Path) -> None:
        from src.checkpoint import write_atomic

        write_atomic(path, lambda handle: np.savez(handle, **{k: getattr(self, k) for k in TABLE_KEYS}))

    def validate(self, source: str) -> None:
        """Refuse tables the range coder cannot use safely: its C++ loop trusts their shapes and values.

        Each channel's CDF must start at 0, rise strictly and reach 2^16 at its
        length, which must fit its row; offsets and medians must be finite and
        small. (CompressAI checks these with ``assert`` only, compiled out of
        its wheels: zero lengths or all-zero CDFs read out of bounds.)
        """
        cdfs, lengths, offsets, medians = self.cdfs, self.cdf_lengths, self.offsets, self.medians
        if cdfs.ndim != 2 or not 1 <= cdfs.shape[0] <= 0xFFFF or not 3 <= cdfs.shape[1] <= MAX_TABLE_LENGTH:
            raise UserError(f"{source}: the CDF table has shape {cdfs.shape}, expected (M, L) with 1 <= M < 2^16 "
                            f"and 3 <= L <= {MAX_TABLE_LENGTH}")
        channels = cdfs.shape[0]
        for key, array in (("cdf_lengths", lengths), ("offsets", offsets), ("medians", medians)):
            if array.shape != (channels,):
                raise UserError(f"{source}: {key} has shape {array.shape}, the CDF table has {channels} channels")
        if lengths.min() < 3 or lengths.max() > cdfs.shape[1]:
            raise UserError(f"{source}: CDF lengths range over {lengths.min()}..{lengths.max()}, outside "
                            f"3..{cdfs.shape[1]} (the rows' length)")
        columns = np.arange(cdfs.shape[1])[None, :]
        inside = columns < lengths[:, None]
        rising = (np.diff(cdfs, axis=1) > 0) | ~inside[:, 1:]
        last = cdfs[np.arange(channels), lengths - 1]
        if np.any(cdfs[:, 0] != 0) or np.any(last != 1 << PRECISION) or not np.all(rising):
            raise UserError(f"{source}: a CDF does not rise strictly from 0 to 2^{PRECISION} within its length")
        if not np.all(np.isfinite(medians)) or np.abs(medians).max() >= SYMBOL_LIMIT \
                or np.abs(offsets.astype(np.int64)).max() >= SYMBOL_LIMIT:
            raise UserError(f"{source}: medians or offsets are not finite values below 2^20")

    @classmethod
    def load(cls, path: Union[Path, BinaryIO]) -> "EntropyTables":
        """The four arrays of an ``entropy.npz`` (not yet validated: see ``validate``).

        Each member's npy header is read first and an array over
        ``MAX_TABLE_BYTES`` refused before numpy allocates it (a header can
        claim any shape, and a deflated member can expand 1000-fold).
        """
        arrays = {}
        with zipfile.ZipFile(path) as archive:
            for key in TABLE_KEYS:
                with archive.open(f"{key}.npy") as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"npy format version {version}")
                    shape, _, dtype = read_header(member)
                    if dtype.hasobject or np.prod(shape, dtype=np.float64) * dtype.itemsize > MAX_TABLE_BYTES:
                        raise ValueError(f"{key} claims {shape} {dtype}, beyond {MAX_TABLE_BYTES} bytes")
                with archive.open(f"{key}.npy") as member:
                    arrays[key] = np.asarray(np.lib.format.read_array(member, allow_pickle=False),
                                             dtype=TABLE_DTYPES[key])
        return cls(**arrays)

    @classmethod
    def from_entropy_bottleneck(cls, entropy_bottleneck) -> "EntropyTables":
        """The tables of an updated ``compressai.entropy_models.EntropyBottleneck``."""
        eb = entropy_bottleneck
        if eb._quantized_cdf.numel() == 0:
            raise ValueError("the entropy bottleneck has no tables: call model.update() first")
        return cls(cdfs=eb._quantized_cdf.cpu().numpy().astype(np.int32),
                   cdf_lengths=eb._cdf_length.reshape(-1).cpu().numpy().astype(np.int32),
                   offsets=eb._offset.reshape(-1).cpu().numpy().astype(np.int32),
                   medians=eb._get_medians().detach().reshape(-1).cpu().numpy().astype(np.float32))


class RangeCoder:
    """CompressAI's rANS coder with one bundle's tables: channel c of the latent uses CDF c.

    Encoding is CompressAI's ``RansEncoder``; decoding is its algorithm with
    bounds checks (``src.codec.rans``), since its ``RansDecoder`` reads past
    a payload too short for its symbols. ``tables`` must have passed
    ``EntropyTables.validate`` (``load_bundle`` does it).
    """

    def __init__(self, tables: EntropyTables):
        self.tables = tables
        self.cdfs = tables.cdfs.tolist()
        self.lengths = tables.cdf_lengths.tolist()
        self.offsets = tables.offsets.tolist()
        self.channels = tables.channels
        freqs = np.diff(tables.cdfs.astype(np.int64), axis=1)
        inside = np.arange(freqs.shape[1])[None, :] < (tables.cdf_lengths[:, None] - 1)
        # The fewest bits any symbol of channel c costs: -log2 of its most likely symbol's probability.
        self.floor_bits = -np.log2(np.where(inside, freqs, 1).max(axis=1) / float(1 << PRECISION))

    def _indexes(self, h: int, w: int) -> np.ndarray:
        return np.repeat(np.arange(self.channels, dtype=np.int32), h * w)

    def payload_bounds(self, h: int, w: int) -> Tuple[int, int]:
        """(fewest, most) bytes a payload of M*h*w symbols can have, from the tables alone (no decoding).

        Fewest: rANS writes at least the symbols' information (each at least
        its channel's ``floor_bits``) less < 5e-5 bit per symbol of rounding
        (its state stays >= 2^31 while a frequency is <= 2^16), in 32-bit words,
        and at least its 8-byte final state. Most: 16 bits per symbol plus a
        bypass value (a 4-bit count and up to 8 nibbles), with the same slack.
        """
        fewest_bits = float(self.floor_bits.sum()) * h * w - 1e-4 * self.channels * h * w
        return max(8, 4 * int(max(fewest_bits, 0.0) // 32)), most_payload_bytes(self.channels * h * w)

    def encode(self, symbols: np.ndarray) -> bytes:
        """(1, M, h, w) integer-valued symbols -> the rANS string ``EntropyBottleneck.compress`` writes."""
        _, _, h, w = symbols.shape
        return RansEncoder().encode_with_indexes(symbols.astype(np.int32).reshape(-1).tolist(),
                                                 self._indexes(h, w).tolist(), self.cdfs, self.lengths, self.offsets)

    def decode(self, payload: bytes, h: int, w: int) -> np.ndarray:
        """The rANS string -> symbols (1, M, h, w) float32; ``ValueError`` for one the encoder cannot have written."""
        values = decode_with_indexes(payload, self._indexes(h, w), self.tables.cdfs, self.tables.cdf_lengths,
                                     self.tables.offsets, SYMBOL_LIMIT)
        return values.astype(np.float32).reshape(1, self.channels, h, w)


def most_payload_bytes(symbols: int) -> int:
    """The longest payload ``symbols`` symbols can take (see ``RangeCoder.payload_bounds``)."""
    return 12 + 4 * -(-symbols * (PRECISION + 4 * (1 + MAX_BYPASS_NIBBLES) + 1) // 32)


def largest_file(channels: int) -> int:
    """Bytes of the largest file a bundle of ``channels`` latent channels can decode (``MAX_PIXELS``)."""
    return HEADER.size + most_payload_bytes(channels * MAX_PIXELS // LATENT_STRIDE ** 2)
