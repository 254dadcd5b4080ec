"""Coverage-guided fuzzing of the codec's decoder: the file parser, the entropy decoding, bundle loading.

    pip install -r bench/requirements-fuzz.txt
    python -m bench.fuzz_codec prepare --out bench_out/fuzz          # a bundle and a corpus of valid inputs
    NUMBA_DISABLE_JIT=1 taskset -c 1 python -m bench.fuzz_codec fuzz --out bench_out/fuzz -- \
        -max_total_time=1800 -timeout=5 -rss_limit_mb=2048 -print_final_stats=1
    bench/fuzz_codec.sh bench_out/fuzz 1800    # the same, restarted after each finding until 1800 s have run
    python -m bench.fuzz_codec replay --out bench_out/fuzz FILE...  # run inputs once, outside libFuzzer

The way image-format libraries are fuzzed (OSS-Fuzz's libpng, libjpeg-turbo):
libFuzzer (through ``atheris``) mutates a corpus of valid inputs and keeps each
mutation that reaches new code. The ``src.codec`` package is
instrumented (``atheris.instrument_imports``); with ``NUMBA_DISABLE_JIT=1``
the range decoder (``src.codec.rans``) runs as Python, so its branches count as coverage too.
The first byte of an input picks what the rest is fed to:

- 0: a file as it is, to ``Codec.decode`` (header, CRC, payload, decoder graph);
- 1: a file whose table hash and CRC are stamped to match the bundle first, so
  that mutations reach the payload checks and the range decoder;
- 2: a bundle's ``manifest.json`` bytes, to ``parse_manifest``;
- 3: an ``entropy.npz``'s bytes, to ``EntropyTables.load`` and ``validate``, and
  a valid tables file then codes and decodes a few symbols;
- 4: a bare payload, straight to the range decoder for a 1x1 image's M*4*4
  symbols (past the length pre-check, so every check of ``src.codec.rans`` is
  reached); one it accepts must be what CompressAI's encoder writes for the
  symbols it decoded, byte for byte.

Anything but a ``UserError`` is a finding (libFuzzer saves the input under
``OUT/artifacts/``); so is an input that runs over ``-timeout`` seconds or
makes the process exceed ``-rss_limit_mb``. Every finding becomes a fixture
in ``tests/fixtures/codec_fuzz/`` that the suite replays (``tests/test_codec_faults.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import struct
import sys
import zlib
from pathlib import Path
from typing import List, Sequence

TARGETS = ("file", "restamped_file", "manifest", "tables", "payload")
SEED_SIZES = ((1, 1), (17, 5), (64, 64), (40, 72))


def stamp(data: bytes, table_hash: bytes) -> bytes:
    """``data`` with the header's table hash set to ``table_hash`` and its CRC-32 recomputed (when it has a header)."""
    from src.codec.format import HEADER

    if len(data) < HEADER.size:
        return data
    head = data[:5] + table_hash + data[21: HEADER.size - 4]
    payload = data[HEADER.size:]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


class Target:
    """The decoder side of one bundle, and the function libFuzzer calls."""

    def __init__(self, bundle_dir: Path, findings: Path = None):
        from src.codec.bundle import Codec, load_bundle

        self.bundle = load_bundle(bundle_dir)
        self.decoder = Codec(self.bundle, "onnxruntime", parts=("decoder",))
        self.findings = findings

    def __call__(self, data: bytes) -> None:
        try:
            self.run(data)
        except Exception:
            if self.findings is not None:  # saved here too: atheris without sanitizers may exit before libFuzzer does
                self.findings.mkdir(parents=True, exist_ok=True)
                (self.findings / f"finding-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
            raise

    def run(self, data: bytes) -> None:
        from src.cli import UserError
        from src.codec.bundle import parse_manifest

        if not data:
            return
        kind, body = data[0] % len(TARGETS), data[1:]
        try:
            if TARGETS[kind] == "file":
                self.decoder.decode(body, "fuzz")
            elif TARGETS[kind] == "restamped_file":
                self.decoder.decode(stamp(body, self.bundle.table_hash), "fuzz")
            elif TARGETS[kind] == "manifest":
                parse_manifest(body, "fuzz")
            elif TARGETS[kind] == "tables":
                self.tables(body)
            else:
                self.payload(body)
        except UserError:
            pass

    def payload(self, body: bytes) -> None:
        """Decode ``body`` as 4x4 latents; accepted payloads must re-encode to themselves (rANS is a bijection)."""
        coder = self.decoder.coder
        try:
            symbols = coder.decode(body, 4, 4)
        except ValueError:
            return
        if coder.encode(symbols) != body:
            raise AssertionError("an accepted payload is not what the encoder writes for its symbols")

    def tables(self, body: bytes) -> None:
        """Load and validate tables; valid ones must code symbols and decode them back exactly."""
        import numpy as np

        from src.codec.tables import TABLE_ERRORS, EntropyTables, RangeCoder

        try:
            tables = EntropyTables.load(io.BytesIO(body))
        except TABLE_ERRORS:
            return
        tables.validate("fuzz")
        coder = RangeCoder(tables)
        symbols = np.arange(-3, 5, dtype=np.float32)[np.arange(tables.channels * 4) % 8]
        symbols = symbols.reshape(1, tables.channels, 2, 2)
        decoded = coder.decode(coder.encode(symbols), 2, 2)
        if not np.array_equal(decoded, symbols):
            raise AssertionError("valid tables did not decode their own symbols")


def prepare(out: Path) -> None:
    """A q1 NPU bundle of random weights (as the tests make) and a seed corpus of valid inputs for each target."""
    import numpy as np
    import torch

    from scripts import export_onnx
    from src.codec.bundle import MANIFEST, TABLES_FILE, Codec, load_bundle
    from src.codec.format import HEADER
    from src.codec.tables import TABLE_KEYS, EntropyTables
    from src.checkpoint import save_checkpoint
    from src.model_factory import build_model, make_arch
    from src.sample_photos import COLOR_PHOTOS, skimage_photos
    from src.images import load_rgb

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    arch = make_arch(quality=1, replace="npu", replace_parts="all")
    model = build_model(arch)
    model.update(force=True)
    save_checkpoint({"state_dict": model.state_dict(), "arch": arch}, out / "model.pt")
    photo = load_rgb(skimage_photos(COLOR_PHOTOS)[0])
    photo.resize((150, 110)).save(out / "verify.png")
    if not (out / "bundle").is_dir():
        export_onnx.main(["--ckpt", str(out / "model.pt"), "--input_size", "64", "--bundle", str(out / "bundle"),
                          "--image", str(out / "verify.png")])
    bundle = load_bundle(out / "bundle")
    coder = Codec(bundle, "onnxruntime", parts=("encoder",))
    seeds = out / "seeds"
    seeds.mkdir(exist_ok=True)
    for width, height in SEED_SIZES:
        data = coder.encode(np.asarray(photo.resize((width, height)), dtype=np.uint8))
        for kind in (0, 1):
            (seeds / f"{TARGETS[kind]}_{width}x{height}").write_bytes(bytes([kind]) + data)
        if (width, height) == (1, 1):
            (seeds / "payload_1x1").write_bytes(bytes([4]) + data[HEADER.size:])
    (seeds / "manifest").write_bytes(bytes([2]) + (out / "bundle" / MANIFEST).read_bytes())
    (seeds / "tables").write_bytes(bytes([3]) + (out / "bundle" / TABLES_FILE).read_bytes())
    small = EntropyTables(bundle.tables.cdfs[:2], bundle.tables.cdf_lengths[:2], bundle.tables.offsets[:2],
                                bundle.tables.medians[:2])
    buffer = io.BytesIO()
    np.savez(buffer, **{key: getattr(small, key) for key in TABLE_KEYS})
    (seeds / "tables_2ch").write_bytes(bytes([3]) + buffer.getvalue())
    print(f"bundle {out / 'bundle'}, {len(list(seeds.iterdir()))} seeds in {seeds}")


def fuzz(out: Path, libfuzzer_args: Sequence[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["src.codec"]):  # the package: format, tables, rans, bundle, latents
        import src.codec.bundle  # noqa: F401 (instrumented here, used by Target)
    target = Target(out / "bundle", findings=out / "artifacts")
    corpus = out / "corpus"
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    corpus.mkdir(exist_ok=True)
    argv = [sys.argv[0], *libfuzzer_args, f"-artifact_prefix={out / 'artifacts'}/", str(corpus), str(out / "seeds")]
    atheris.Setup(argv, target)
    atheris.Fuzz()


def replay(out: Path, files: List[Path]) -> None:
    target = Target(out / "bundle")
    for path in files:
        target(path.read_bytes())
        print(f"{path}: handled")


def main(argv: Sequence[str] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Fuzz the codec's decoder with atheris (libFuzzer).")
    p.add_argument("mode", choices=("prepare", "fuzz", "replay"))
    p.add_argument("--out", default="bench_out/fuzz", help="bundle, seeds, corpus and artifacts")
    p.add_argument("files", nargs="*", type=Path, help="inputs to replay")
    args = p.parse_intermixed_args(argv)
    out = Path(args.out)
    if args.mode == "prepare":
        prepare(out)
    elif args.mode == "fuzz":
        fuzz(out, extra)
    else:
        replay(out, args.files)


if __name__ == "__main__":
    main()
