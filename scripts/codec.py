"""Image -> file -> PNG with an exported codec bundle (``scripts.export_onnx --bundle DIR``).

    python -m scripts.codec encode -b bundle/ photo.jpg -o photo.npcf [--runtime openvino]
    python -m scripts.codec decode -b bundle/ photo.npcf -o photo.png
    python -m scripts.codec audit -b bundle/ [--runtime openvino]

Needs only the bundle, onnxruntime or OpenVINO, and CompressAI's range coder:
no checkpoint, no training code. Images of any shape up to ``src.codec.limits.MAX_PIXELS`` (8 388 608 pixels
once padded to 64, cropped back), refused above it before any pixel is decoded. ``-o`` must be a new or regular
file that is not the input (decode writes ``.png``; encode never writes under an image's name).
The file format and the bundle are described in ``src/codec/bundle.py`` and
``docs/codec.md``. A file decodes with any bundle of the same model and
entropy tables (FP32 or INT8, either runtime); a file made with other
tables, a truncated or corrupt file and a wrong magic are refused in one line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from src.cli import UserError, run_cli
from src.codec.bundle import GRAPH_FILES, Bundle, Codec, image_array, load_bundle
from src.codec.format import HEADER
from src.codec.runtimes import RUNTIMES, audit_line, runtime_audit
from src.codec.tables import largest_file
from src.outputs import check_output_file, write_output

# decode writes PNG (lossless: the decoded pixels as they are); encode writes a codec file, never under an image's name.
DECODED_SUFFIXES = (".png",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Encode an image to a file, or decode a file to a PNG, with a bundle.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text, source in (("encode", "image -> file", "IMAGE"), ("decode", "file -> PNG", "FILE")):
        cmd = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        cmd.add_argument("source", metavar=source)
        cmd.add_argument("-o", "--out", required=True, help="output file" + (" (PNG)" if name == "decode" else ""))
    sub.add_parser("audit", help="what the runtime executes for each graph, in integer or float",
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for cmd in sub.choices.values():
        cmd.add_argument("-b", "--bundle", required=True, help="bundle folder (scripts.export_onnx --bundle)")
        cmd.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
    return p


def read_bytes(path: Path, bundle: Bundle) -> bytes:
    """The file to decode, read only when it is no longer than the largest file the bundle can decode."""
    if not path.is_file():
        raise UserError(f"{path} not found")
    size, largest = path.stat().st_size, largest_file(bundle.tables.channels)
    if size > largest:
        raise UserError(f"{path} is {size} bytes, more than the {largest} of the largest image this codec decodes")
    return path.read_bytes()


def check_out(args: argparse.Namespace) -> Path:
    """-o, before the bundle is loaded: not the input, a folder, a device, a FIFO, or a name of the wrong kind."""
    out = Path(args.out)
    if args.command == "decode":
        return check_output_file(out, "-o", inputs=[Path(args.source)], suffixes=DECODED_SUFFIXES, what="a PNG")
    if out.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"-o {out}: encode writes a codec file, not an image; name it e.g. {out.with_suffix('.npcf')}")
    return check_output_file(out, "-o", inputs=[Path(args.source)])


def encode(args: argparse.Namespace, bundle: Bundle) -> Dict:
    image = image_array(Path(args.source))
    coder = Codec(bundle, args.runtime, parts=("encoder",))
    start = time.perf_counter()
    data = coder.encode(image, args.source)
    seconds = time.perf_counter() - start
    write_output(Path(args.out), lambda handle: handle.write(data), "-o")
    height, width = image.shape[:2]
    print(f"{args.source} ({width}x{height}) -> {args.out}: {len(data)} bytes, "
          f"{8 * len(data) / (height * width):.4f} bpp ({HEADER.size}-byte header), "
          f"{seconds:.2f} s on {args.runtime}")
    return {"bytes": len(data), "seconds": seconds}


def decode(args: argparse.Namespace, bundle: Bundle) -> Dict:
    from PIL import Image

    data = read_bytes(Path(args.source), bundle)
    coder = Codec(bundle, args.runtime, parts=("decoder",))
    start = time.perf_counter()
    image = coder.decode(data, args.source)
    seconds = time.perf_counter() - start
    write_output(Path(args.out), lambda handle: Image.fromarray(image).save(handle, format="PNG"), "-o")
    print(f"{args.source} -> {args.out} ({image.shape[1]}x{image.shape[0]}), {seconds:.2f} s on {args.runtime}")
    return {"shape": image.shape, "seconds": seconds}


def audit(args: argparse.Namespace, bundle: Bundle) -> Dict:
    report = {}
    for part, name in GRAPH_FILES.items():
        report[part] = runtime_audit(bundle.folder / name, args.runtime)
        print(f"{part} on {args.runtime}: {audit_line(report[part])}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    if args.command in ("encode", "decode"):
        check_out(args)
    bundle = load_bundle(Path(args.bundle))
    return {"encode": encode, "decode": decode, "audit": audit}[args.command](args, bundle)


if __name__ == "__main__":
    run_cli(main)
