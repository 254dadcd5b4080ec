"""CompressAI's rANS decoding, with every read and every value checked: a crafted payload is refused, never obeyed.

CompressAI 1.2.8's ``RansDecoder.decode_with_indexes``
(``compressai/cpp_exts/rans/rans_interface.cpp``) trusts its input: it reads
a 32-bit word whenever the state runs low, whether or not the payload has one
left (an empty payload or one of 8 bytes under a header that claims a few
thousand symbols makes it read past the end of the buffer until the process
dies with SIGSEGV), and its bypass escape (``while (val == 15)``) counts
nibbles without limit, so random bytes decode to values of any size. This is
the same algorithm, line for line (ryg_rans' ``Rans64`` with 32-bit words,
16-bit CDFs, CompressAI's 4-bit bypass coding), with three checks added:

- a read past the last word stops decoding (the payload is too short for its symbols);
- a bypass value longer than ``MAX_BYPASS_NIBBLES`` or a symbol with |s| >= ``symbol_limit``
  stops decoding (the encoder never writes one: ``src.codec.latents.LATENT_LIMIT``);
- at the end every word must have been read and the state must be back at
  ``RANS64_L``, where the encoder started (rANS decoding retraces the encoder's
  states in reverse, so a payload it wrote ends exactly there): a longer or
  altered payload is refused instead of yielding symbols the encoder never coded.

The encoder stays CompressAI's (``RansEncoder``): for symbols within the bound
and tables ``EntropyTables.validate`` accepts, it reads only its own buffers.
Compiled with numba (the loop is one symbol at a time; in pure Python it
runs ~50x slower); ``NUMBA_DISABLE_JIT=1`` runs the same source as Python,
which is how the fuzzer (``bench/fuzz_codec.py``) sees its branches.
"""

from __future__ import annotations

import numpy as np
from numba import njit

RANS64_L = 1 << 31
PRECISION = 16
BYPASS_BITS = 4
MAX_BYPASS = (1 << BYPASS_BITS) - 1
MAX_BYPASS_NIBBLES = 8
"""A bypass value of more than 8 nibbles (32 bits) exceeds any symbol the encoder codes (|s| < 2^20)."""

OK, TOO_SHORT, OUT_OF_BOUND, LEFT_OVER = 0, 1, 2, 3
STATUS_TEXT = {
    TOO_SHORT: "its payload ends before its symbols do",
    OUT_OF_BOUND: "its payload decodes to a symbol beyond the bound the encoder enforces",
    LEFT_OVER: "its payload holds more than its symbols (or was altered)",
}


@njit(cache=True, nogil=True)
def _decode(words, indexes, cdfs, lengths, offsets, symbol_limit, out):
    """Decode ``len(out)`` symbols into ``out``; returns a status code (``OK`` ... ``LEFT_OVER``)."""
    n_words = words.shape[0]
    if n_words < 2:
        return TOO_SHORT
    state = np.uint64(words[0]) | (np.uint64(words[1]) << np.uint64(32))
    ptr = 2
    mask = np.uint64((1 << PRECISION) - 1)
    low = np.uint64(RANS64_L)
    for i in range(out.shape[0]):
        c = indexes[i]
        length = lengths[c]
        max_value = length - 2
        cum_freq = np.int64(state & mask)
        s = 0
        while s + 1 < length - 1 and cdfs[c, s + 1] <= cum_freq:
            s += 1
        start = np.uint64(cdfs[c, s])
        freq = np.uint64(cdfs[c, s + 1] - cdfs[c, s])
        state = freq * (state >> np.uint64(PRECISION)) + (state & mask) - start
        if state < low:
            if ptr >= n_words:
                return TOO_SHORT
            state = (state << np.uint64(32)) | np.uint64(words[ptr])
            ptr += 1
        value = np.int64(s)
        if s == max_value:
            n_bypass = 0
            val = MAX_BYPASS
            first = True
            while first or val == MAX_BYPASS:
                first = False
                val = np.int64(state & np.uint64(MAX_BYPASS))
                state = state >> np.uint64(BYPASS_BITS)
                if state < low:
                    if ptr >= n_words:
                        return TOO_SHORT
                    state = (state << np.uint64(32)) | np.uint64(words[ptr])
                    ptr += 1
                n_bypass += val
                if n_bypass > MAX_BYPASS_NIBBLES:
                    return OUT_OF_BOUND
            raw = np.int64(0)
            for j in range(n_bypass):
                val = np.int64(state & np.uint64(MAX_BYPASS))
                state = state >> np.uint64(BYPASS_BITS)
                if state < low:
                    if ptr >= n_words:
                        return TOO_SHORT
                    state = (state << np.uint64(32)) | np.uint64(words[ptr])
                    ptr += 1
                raw |= val << (j * BYPASS_BITS)
            value = raw >> 1
            if raw & 1:
                value = -value - 1
            else:
                value += max_value
        symbol = value + offsets[c]
        if symbol >= symbol_limit or symbol <= -symbol_limit:
            return OUT_OF_BOUND
        out[i] = symbol
    if ptr != n_words or state != low:
        return LEFT_OVER
    return OK


def decode_with_indexes(payload: bytes, indexes: np.ndarray, cdfs: np.ndarray, lengths: np.ndarray,
                        offsets: np.ndarray, symbol_limit: int) -> np.ndarray:
    """What ``compressai.ans.RansDecoder().decode_with_indexes`` returns for a payload it wrote, as int32.

    Raises ``ValueError`` (with a ``STATUS_TEXT`` message) for any payload the
    encoder could not have written for these indexes and tables. The tables
    must have passed ``EntropyTables.validate`` (the loop trusts their shapes).
    """
    if len(payload) % 4:
        raise ValueError(f"its payload of {len(payload)} bytes is not a whole number of 32-bit words")
    words = np.frombuffer(payload, dtype="<u4")
    out = np.empty(len(indexes), dtype=np.int32)
    status = _decode(words, np.ascontiguousarray(indexes, dtype=np.int32), np.ascontiguousarray(cdfs, np.int32),
                     np.ascontiguousarray(lengths, np.int32), np.ascontiguousarray(offsets, np.int32),
                     int(symbol_limit), out)
    if status != OK:
        raise ValueError(STATUS_TEXT[status])
    return out
