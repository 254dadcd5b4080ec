"""The factorized prior's tables and the range coder that reads them (``compressai.ans``).

The prior is factorized and static: every latent element of channel c is
coded with CDF c, whatever the image. So the tables are the whole contract
between an encoder and a decoder; any encoder and any decoder graph of the
same model (FP32 or INT8) exchange files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from compressai.ans import RansDecoder, RansEncoder

TABLE_KEYS = ("cdfs", "cdf_lengths", "offsets", "medians")
TABLE_DTYPES = {"cdfs": np.int32, "cdf_lengths": np.int32, "offsets": np.int32, "medians": np.float32}


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

    @classmethod
    def load(cls, path: Path) -> "EntropyTables":
        with np.load(path, allow_pickle=False) as data:
            return cls(**{k: np.asarray(data[k], dtype=TABLE_DTYPES[k]) for k in TABLE_KEYS})

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
    """CompressAI's rANS coder with one bundle's tables: channel c of the latent uses CDF c."""

    def __init__(self, tables: EntropyTables):
        self.cdfs = tables.cdfs.tolist()
        self.lengths = tables.cdf_lengths.tolist()
        self.offsets = tables.offsets.tolist()
        self.channels = tables.channels

    def _indexes(self, h: int, w: int) -> list:
        return np.repeat(np.arange(self.channels, dtype=np.int32), h * w).tolist()

    def encode(self, symbols: np.ndarray) -> bytes:
        """(1, M, h, w) integer-valued symbols -> the rANS string ``EntropyBottleneck.compress`` writes."""
        _, _, h, w = symbols.shape
        return RansEncoder().encode_with_indexes(symbols.astype(np.int32).reshape(-1).tolist(), self._indexes(h, w),
                                                 self.cdfs, self.lengths, self.offsets)

    def decode(self, payload: bytes, h: int, w: int) -> np.ndarray:
        """The rANS string -> symbols (1, M, h, w) float32."""
        values = RansDecoder().decode_with_indexes(payload, self._indexes(h, w), self.cdfs, self.lengths, self.offsets)
        return np.asarray(values, dtype=np.float32).reshape(1, self.channels, h, w)
