"""The shipped codec: a bundle (two graphs, the entropy tables, a manifest), its file format, and its runtimes.

Decoding needs this module, the bundle, a runtime (onnxruntime or OpenVINO)
and CompressAI's rANS coder (``compressai.ans``), nothing of the training
code and no checkpoint. ``src.bundle`` writes bundles; ``scripts.codec`` is
the command line.

**Bundle** (a folder)::

    manifest.json   format, architecture, quality, precision profile, upsampling,
                    sha256 of the tables and of each graph, measured round trip
    encoder.onnx    x (1, 3, H, W) float32 in [0, 1] -> symbols = round(g_a(x) - median)
    decoder.onnx    symbols (1, M, H/16, W/16) float32 -> x_hat = g_s(symbols + median)
    entropy.npz     the factorized prior's tables, as CompressAI's EntropyBottleneck
                    holds them after update(): quantized CDFs (M, L) int32, CDF lengths
                    (M,) int32, offsets (M,) int32, medians (M,) float32

The prior is factorized and static: every latent element of channel c is
coded with CDF c, whatever the image. So the tables are the whole contract
between an encoder and a decoder; any encoder and any decoder graph of the
same model (FP32 or INT8) exchange files.

**File** (little-endian): a 43-byte header, then the rANS payload::

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
file is the bits ``src.eval`` counts plus the header.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import numpy as np
from compressai.ans import RansDecoder, RansEncoder
from compressai.ops import compute_padding

from src.cli import UserError
from src.latents import check_codable

MAGIC = b"NPCF"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sB16sIIHHHII")
HASH_BYTES = 16
PAD_MULTIPLE = 64
LATENT_STRIDE = 16
BUNDLE_FORMAT = "npu-codec-bundle"
BUNDLE_VERSION = 1
MANIFEST, TABLES_FILE = "manifest.json", "entropy.npz"
GRAPH_FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
RUNTIMES = ("onnxruntime", "openvino")
TABLE_KEYS = ("cdfs", "cdf_lengths", "offsets", "medians")
TABLE_DTYPES = {"cdfs": np.int32, "cdf_lengths": np.int32, "offsets": np.int32, "medians": np.float32}

Graph = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------- entropy tables

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


# ---------------------------------------------------------------- runtimes

def load_graph(path: Path, runtime: str) -> Graph:
    """One graph on the CPU of ``runtime``, as a function of its single input array to its single output."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda array: session.run(None, {name: array})[0]
    if runtime == "openvino":
        compiled = openvino_model(path)
        output = compiled.output(0)
        return lambda array: compiled([array])[output]
    raise UserError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")


def openvino_model(path: Path):
    """OpenVINO's CPU plugin, with float parts kept in f32 (its default on bf16/AMX CPUs is bf16 inference)."""
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


# Integer kernels as the runtimes name them: onnxruntime's QLinear*/…Integer ops; OpenVINO's layers whose
# runtime precision is an integer type.
INTEGER_PRECISIONS = ("u8", "i8", "u16", "i16")
QUANTISE_OPS = ("QuantizeLinear", "DequantizeLinear", "FakeQuantize", "Convert")
LAYOUT_OPS = ("Transpose", "DepthToSpace", "SpaceToDepth", "Reorder", "Reshape", "ReorderInput", "ReorderOutput")
PLUMBING_OPS = ("Const", "Input", "Parameter", "Output", "Result", "Shape", "Identity")


def runtime_audit(path: Path, runtime: str) -> Dict[str, Dict[str, int]]:
    """What ``runtime`` executes for the graph at ``path``, after its own graph optimisations.

    ``{"integer": {op: n}, "float": {op: n}, "quantise": {op: n}, "layout": {op: n}}``:
    compute ops that run on integer kernels, compute ops that run in float,
    the (de)quantise steps between them, and data movement (no arithmetic). onnxruntime: the nodes of the graph it
    optimised (QDQ groups fused into ``QLinearConv`` etc.); OpenVINO: the
    layers of the compiled CPU model with their runtime precision.
    """
    found: Dict[str, Dict[str, int]] = {"integer": {}, "float": {}, "quantise": {}, "layout": {}}

    def count(kind: str, op: str) -> None:
        found[kind][op] = found[kind].get(op, 0) + 1

    if runtime == "onnxruntime":
        import onnx
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            options.log_severity_level = 3  # the saved graph is this machine's: that is what the audit wants
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            nodes = onnx.load(options.optimized_model_filepath).graph.node
        for node in nodes:
            op = node.op_type
            if op in QUANTISE_OPS or op in LAYOUT_OPS:
                count("quantise" if op in QUANTISE_OPS else "layout", op)
            elif op not in PLUMBING_OPS:
                count("integer" if op.startswith("QLinear") or op.endswith("Integer") else "float", op)
    elif runtime == "openvino":
        for op in openvino_model(path).get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
            if layer in QUANTISE_OPS or layer in LAYOUT_OPS:
                count("quantise" if layer in QUANTISE_OPS else "layout", layer)
            elif layer not in PLUMBING_OPS:
                count("integer" if precision in INTEGER_PRECISIONS else "float", layer)
    else:
        raise UserError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    return {kind: dict(sorted(ops.items())) for kind, ops in found.items()}


def audit_line(found: Mapping[str, Mapping[str, int]]) -> str:
    def ops(kind: str) -> str:
        return ", ".join(f"{op}x{n}" for op, n in found[kind].items()) or "none"

    return (f"integer: {ops('integer')} | float: {ops('float')} | (de)quantise: {ops('quantise')} | "
            f"layout: {ops('layout')}")


# ---------------------------------------------------------------- bundle

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


def load_bundle(folder: Path) -> Bundle:
    """Read and verify a bundle: its manifest, then the sha256 of its tables and of each graph."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a codec bundle (no {MANIFEST}); write one with "
                        "python -m scripts.export_onnx --ckpt CKPT --bundle DIR")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a readable manifest ({type(err).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{path} is not the manifest of a codec bundle")
    if manifest.get("version") != BUNDLE_VERSION:
        raise UserError(f"{folder} is a version {manifest.get('version')} bundle; this codec reads version "
                        f"{BUNDLE_VERSION}")
    try:
        tables = EntropyTables.load(folder / TABLES_FILE)
    except (OSError, KeyError, ValueError, zlib.error) as err:
        raise UserError(f"{folder / TABLES_FILE}: unreadable entropy tables ({type(err).__name__})") from None
    if tables.digest() != manifest["entropy"]["sha256"]:
        raise UserError(f"{folder / TABLES_FILE} does not match the hash in {path}: the bundle was altered")
    for part, name in GRAPH_FILES.items():
        graph = folder / name
        if not graph.is_file() or file_sha256(graph) != manifest["graphs"][part]["sha256"]:
            raise UserError(f"{graph} is missing or does not match the hash in {path}: the bundle was altered")
    return Bundle(folder, manifest, tables)


# ---------------------------------------------------------------- coding

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
    return header, payload


def image_array(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (``src.images.load_rgb``: EXIF orientation, any mode)."""
    from src.images import DECODE_ERRORS, load_rgb

    if not Path(path).is_file():
        raise UserError(f"image {path} not found")
    try:
        return np.array(load_rgb(Path(path)), dtype=np.uint8)
    except DECODE_ERRORS as err:
        raise UserError(f"{path} cannot be read as an image ({str(err).splitlines()[0][:100]})") from None


def padded_input(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the encoder's input (1, 3, H', W') float32 in [0, 1], zero-padded to PAD_MULTIPLE."""
    (left, right, top, bottom), _ = compute_padding(*image.shape[:2], min_div=PAD_MULTIPLE)
    x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def encode_array(bundle: Bundle, encoder: Graph, coder: RangeCoder, image: np.ndarray, source: str = "image",
                 return_symbols: bool = False):
    """(H, W, 3) uint8 -> the file's bytes (and the symbols, with ``return_symbols``)."""
    height, width = image.shape[:2]
    latent = encoder(padded_input(image))
    check_codable(latent, source)
    symbols = np.rint(latent)  # the graph's output already holds integers; rint is the identity there
    expected = (1, coder.channels, *latent_size(height, width))
    if symbols.shape != expected:
        raise UserError(f"the bundle's encoder gave symbols of shape {symbols.shape}, expected {expected}")
    if max(expected[2:]) > 0xFFFF or max(height, width) > 0xFFFFFFFF:
        raise UserError(f"{source} is {width}x{height}: too large for this file format")
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
    symbols = coder.decode(payload, header.latent_h, header.latent_w)
    x_hat = decoder(symbols)
    _, (left, right, top, bottom) = compute_padding(header.height, header.width, min_div=PAD_MULTIPLE)
    x_hat = x_hat[0, :, -top: x_hat.shape[2] + bottom, -left: x_hat.shape[3] + right]
    image = np.rint(np.clip(x_hat, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return (image, symbols) if return_symbols else image


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
