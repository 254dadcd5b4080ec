"""The shipped codec: a bundle (two graphs, the entropy tables, a manifest) on a runtime, as ``encode`` / ``decode``.

Decoding needs this package, the bundle, a runtime (onnxruntime or OpenVINO)
and CompressAI's rANS coder (``compressai.ans``), nothing of the training
code and no checkpoint. ``src.codec.build`` writes bundles; ``scripts.codec``
is the command line; the file format is ``src.codec.format``.

**A decoder that validates before it allocates.** A file is untrusted input:
the header must be consistent (latent size = the image's, channels = the
tables', at most ``src.codec.limits.MAX_PIXELS`` pixels), the payload length
must lie within what M*h*w symbols can take with these tables
(``RangeCoder.payload_bounds``), and the payload must decode, within its
bytes, to symbols the encoder could have written, using every byte
(``src.codec.rans``). A bundle's manifest and tables are checked the same way
when it loads (``check_manifest``, ``EntropyTables.validate``). Each violation
is one ``UserError`` line; ``bench/fuzz_codec.py`` fuzzes all of it.

**Bundle** (a folder)::

    manifest.json   format, architecture, quality, precision profile, upsampling,
                    sha256 of the tables and of each graph, measured round trip
    encoder.onnx    x (1, 3, H, W) float32 in [0, 1] -> symbols = round(g_a(x) - median)
    decoder.onnx    symbols (1, M, H/16, W/16) float32 -> x_hat = g_s(symbols + median)
    entropy.npz     the factorized prior's tables, as CompressAI's EntropyBottleneck
                    holds them after update(): quantized CDFs (M, L) int32, CDF lengths
                    (M,) int32, offsets (M,) int32, medians (M,) float32
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np
from compressai.ops import compute_padding

from src.cli import UserError
from src.codec.format import HASH_BYTES, PAD_MULTIPLE, Header, check_pixels, latent_size, pack, unpack
from src.codec.latents import check_codable
from src.codec.runtimes import Graph, load_graph
from src.codec.tables import TABLE_ERRORS, EntropyTables, RangeCoder

BUNDLE_FORMAT = "npu-codec-bundle"
BUNDLE_VERSION = 1
MANIFEST, TABLES_FILE = "manifest.json", "entropy.npz"
GRAPH_FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}


@dataclass
class Bundle:
    folder: Path
    manifest: Dict[str, Any]
    tables: EntropyTables

    @property
    def table_hash(self) -> bytes:
        return bytes.fromhex(self.manifest["entropy"]["sha256"])[:HASH_BYTES]

    def graph(self, part: str, runtime: str) -> Graph:
        return load_graph(self.folder / GRAPH_FILES[part], runtime)

    def coder(self) -> RangeCoder:
        return RangeCoder(self.tables)


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def read_manifest(path: Path) -> Dict[str, Any]:
    """A bundle's manifest, refused in one line unless it holds what ``load_bundle`` reads, of the right types."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path} is not a readable manifest ({err.strerror or type(err).__name__})") from None
    return parse_manifest(raw, str(path))


def parse_manifest(raw: bytes, source: str) -> Dict[str, Any]:
    """``raw`` JSON as a checked manifest (``check_manifest``); malformed or absurdly nested JSON is one line."""
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{source} is not a readable manifest ({type(err).__name__})") from None
    return check_manifest(manifest, source)


def check_manifest(manifest: Any, source: str) -> Dict[str, Any]:
    """``manifest`` (parsed JSON) if it is a codec bundle's of this version with a sha256 for each of its files."""
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{source} is not the manifest of a codec bundle")
    if manifest.get("version") != BUNDLE_VERSION:
        raise UserError(f"{source} is a version {str(manifest.get('version'))[:20]} bundle; this codec reads "
                        f"version {BUNDLE_VERSION}")

    def digest(entry: Any) -> bool:
        text = entry.get("sha256") if isinstance(entry, dict) else None
        return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)

    graphs = manifest.get("graphs")
    if not digest(manifest.get("entropy")) or not isinstance(graphs, dict) \
            or not all(digest(graphs.get(part)) for part in GRAPH_FILES):
        raise UserError(f"{source} lacks the sha256 of the entropy tables or of a graph: the bundle is damaged")
    return manifest


def load_bundle(folder: Path) -> Bundle:
    """Read and verify a bundle: its manifest, the tables' shapes and values, the sha256 of tables and graphs."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a codec bundle (no {MANIFEST}); write one with "
                        "python -m scripts.export_onnx --ckpt CKPT --bundle DIR")
    manifest = read_manifest(path)
    try:
        tables = EntropyTables.load(folder / TABLES_FILE)
    except TABLE_ERRORS as err:
        raise UserError(f"{folder / TABLES_FILE}: unreadable entropy tables ({type(err).__name__})") from None
    if tables.digest() != manifest["entropy"]["sha256"]:
        raise UserError(f"{folder / TABLES_FILE} does not match the hash in {path}: the bundle was altered")
    tables.validate(str(folder / TABLES_FILE))
    for part, name in GRAPH_FILES.items():
        graph = folder / name
        if not graph.is_file() or file_sha256(graph) != manifest["graphs"][part]["sha256"]:
            raise UserError(f"{graph} is missing or does not match the hash in {path}: the bundle was altered")
    return Bundle(folder, manifest, tables)


# ---------------------------------------------------------------- coding


def image_array(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (``src.images.read_rgb``), refused above ``MAX_PIXELS`` before decoding."""
    from src.images import read_rgb

    def fits(width: int, height: int) -> None:
        check_pixels(height, width, str(path))

    return np.array(read_rgb(Path(path), "image", check_size=fits), dtype=np.uint8)


def padded_input(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the encoder's input (1, 3, H', W') float32 in [0, 1], zero-padded to PAD_MULTIPLE."""
    (left, right, top, bottom), _ = compute_padding(*image.shape[:2], min_div=PAD_MULTIPLE)
    x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def encode_array(bundle: Bundle, encoder: Graph, coder: RangeCoder, image: np.ndarray, source: str = "image",
                 return_symbols: bool = False):
    """(H, W, 3) uint8 -> the file's bytes (and the symbols, with ``return_symbols``)."""
    height, width = image.shape[:2]
    check_pixels(height, width, source)
    latent = encoder(padded_input(image))
    check_codable(latent, source)
    symbols = np.rint(latent)  # the graph's output already holds integers; rint is the identity there
    expected = (1, coder.channels, *latent_size(height, width))
    if symbols.shape != expected:
        raise UserError(f"the bundle's encoder gave symbols of shape {symbols.shape}, expected {expected}")
    header = Header(bundle.table_hash, height, width, coder.channels, *expected[2:], 0)
    data = pack(header, coder.encode(symbols))
    return (data, symbols) if return_symbols else data


def decode_bytes(bundle: Bundle, decoder: Graph, coder: RangeCoder, data: bytes, source: str = "file",
                 return_symbols: bool = False):
    """The file's bytes -> (H, W, 3) uint8 (and the symbols, with ``return_symbols``)."""
    header, payload = unpack(data, source)
    if header.table_hash != bundle.table_hash:
        raise UserError(f"{source} was made with other entropy tables ({header.table_hash.hex()[:12]}..., this "
                        f"bundle has {bundle.table_hash.hex()[:12]}...): decode it with the bundle that encoded it")
    if header.channels != coder.channels:
        raise UserError(f"{source} is corrupt: {header.channels} latent channels, the tables have {coder.channels}")
    symbols = decode_symbols(coder, header, payload, source)
    x_hat = decoder(symbols)
    _, (left, right, top, bottom) = compute_padding(header.height, header.width, min_div=PAD_MULTIPLE)
    x_hat = x_hat[0, :, -top: x_hat.shape[2] + bottom, -left: x_hat.shape[3] + right]
    image = np.rint(np.clip(x_hat, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return (image, symbols) if return_symbols else image


def decode_symbols(coder: RangeCoder, header: Header, payload: bytes, source: str) -> np.ndarray:
    """The payload's symbols, after checking that its length can hold them and is no more than they need."""
    fewest, most = coder.payload_bounds(header.latent_h, header.latent_w)
    if not fewest <= len(payload) <= most:
        raise UserError(f"{source} is corrupt: a {header.width}x{header.height} image's payload takes "
                        f"{fewest}..{most} bytes with these tables, this one has {len(payload)}")
    try:
        return coder.decode(payload, header.latent_h, header.latent_w)
    except ValueError as err:
        raise UserError(f"{source} is corrupt: {err}") from None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit images over all pixels and channels (``src.losses.psnr_8bit`` on uint8 arrays)."""
    mse = max(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)), 1e-10)
    return float(20 * np.log10(255) - 10 * np.log10(mse))


class Codec:
    """A bundle on one runtime: ``encode(image) -> bytes`` and ``decode(bytes) -> image``."""

    def __init__(self, bundle: Bundle, runtime: str = "onnxruntime",
                 parts: Sequence[str] = ("encoder", "decoder")):
        self.bundle, self.runtime, self.coder = bundle, runtime, bundle.coder()
        self.encoder = bundle.graph("encoder", runtime) if "encoder" in parts else None
        self.decoder = bundle.graph("decoder", runtime) if "decoder" in parts else None

    def encode(self, image: np.ndarray, source: str = "image", return_symbols: bool = False):
        return encode_array(self.bundle, self.encoder, self.coder, image, source, return_symbols)

    def decode(self, data: bytes, source: str = "file", return_symbols: bool = False):
        return decode_bytes(self.bundle, self.decoder, self.coder, data, source, return_symbols)
