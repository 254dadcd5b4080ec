"""The shipped codec: bundles from scripts.export_onnx, image -> file -> PNG with scripts.codec, on both runtimes."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from PIL import Image
from torch import nn

from scripts import codec as codec_cli, export_onnx
from src.checkpoint import save_checkpoint
from src.cli import UserError, run_cli
from src.codec.bundle import Bundle, Codec, file_sha256, load_bundle, padded_input, psnr
from src.codec.format import HEADER, latent_size, unpack
from src.codec.roundtrip import bitstream_roundtrip
from src.codec.runtimes import RUNTIMES, load_graph, runtime_audit
from src.codec.subpixel import can_rewrite, subpixel_from_convtranspose, subpixel_rewrite
from src.codec.tables import EntropyTables
from src.images import image_tensor, load_rgb
from src.model_factory import build_model, make_arch
from src.quant.onnx_export import op_histogram
from src.quant.ptq import ArrayReader, prepared
from src.quant.symbols import SymbolDecoder, export_module

REPO = Path(__file__).resolve().parents[1]

# Every bundle verifies on OpenVINO: these tests run in a pytest process of their own (run.sh, the marker's note)
pytestmark = pytest.mark.own_process


@pytest.fixture(scope="module")
def setup(codec_files, tmp_path_factory):
    """``codec_files`` (a q1 NPU-all checkpoint, photos of odd sizes, its FP32 bundle) and an INT8 sub-pixel bundle
    (in this worker's own folder: ``codec_files`` is shared by the session's workers and nobody writes into it)."""
    root = codec_files["root"]
    bundles = {"fp32": codec_files["bundle"], "int8_subpixel": tmp_path_factory.mktemp("codec") / "int8_sub"}
    base = ["--ckpt", str(codec_files["ckpt"]), "--input_size", "64"]
    manifests = {
        "fp32": codec_files["report"],
        "int8_subpixel": export_onnx.main(base + ["--bundle", str(bundles["int8_subpixel"]), "--int8",
                                                  str(root / "calib"), "--calib_count", "4", "--upsample",
                                                  "subpixel"]),
    }
    return {"root": root, "ckpt": codec_files["ckpt"], "bundles": bundles, "reports": manifests,
            "model": codec_files["model"]}


def encode_decode(bundle: Path, image: Path, tmp: Path, runtime: str = "onnxruntime", decoder_bundle=None):
    tmp.mkdir(parents=True, exist_ok=True)
    file, png = tmp / f"{image.stem}.{runtime}.npcf", tmp / f"{image.stem}.{runtime}.png"
    codec_cli.main(["encode", "-b", str(bundle), str(image), "-o", str(file), "--runtime", runtime])
    codec_cli.main(["decode", "-b", str(decoder_bundle or bundle), str(file), "-o", str(png), "--runtime", runtime])
    return file.read_bytes(), np.asarray(Image.open(png).convert("RGB"))


def test_bundle_contents_and_manifest(setup):
    folder = setup["bundles"]["fp32"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["arch"]["replace"] == "npu" and manifest["quality"] == 1 and manifest["latent_channels"] == 192
    assert manifest["precision"]["profile"] == "fp32" and manifest["upsample"] == "convtranspose"
    for part in ("encoder", "decoder"):
        assert manifest["graphs"][part]["sha256"] == hashlib.sha256((folder / f"{part}.onnx").read_bytes()).hexdigest()
    tables = EntropyTables.load(folder / "entropy.npz")
    eb = setup["model"].entropy_bottleneck
    assert np.array_equal(tables.cdfs, eb._quantized_cdf.numpy()) and np.array_equal(tables.offsets, eb._offset.numpy())
    assert tables.digest() == manifest["entropy"]["sha256"]
    v = manifest["verification"]
    assert v["onnxruntime"]["bpp"] > 0 and np.isfinite(v["onnxruntime"]["psnr"])
    graph = onnx.load(str(folder / "encoder.onnx")).graph
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["symbols"]
    assert not set(manifest["graphs"]["encoder"]["ops"]) & {"Div", "Sqrt", "Pow"}  # NPU-all
    assert manifest["audit"]["decoder"]["npu_forbidden_ops"] == []


def test_round_trip_any_size_and_file_is_the_bits_eval_counts(setup, tmp_path):
    model = setup["model"]
    medians = model.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
    for name, (w, h) in (("a", (150, 110)), ("b", (90, 130))):
        image = setup["root"] / f"{name}.png"
        data, decoded = encode_decode(setup["bundles"]["fp32"], image, tmp_path)
        assert decoded.shape == (h, w, 3)
        header, payload = unpack(data, "file")
        assert (header.height, header.width, header.latent_h, header.latent_w) == (h, w, *latent_size(h, w))
        # The payload is byte for byte what CompressAI's EntropyBottleneck writes for these symbols...
        bundle = load_bundle(setup["bundles"]["fp32"])
        symbols = bundle.coder().decode(payload, header.latent_h, header.latent_w)
        assert payload == model.entropy_bottleneck.compress(torch.from_numpy(symbols) + medians)[0]
        # ... and the symbols are PyTorch's, except where FP32 sums in another order cross a rounding boundary.
        x = image_tensor(load_rgb(image))
        coded = bitstream_roundtrip(model, x)
        with torch.no_grad():
            centred = (model.g_a(torch.from_numpy(padded_input(np.asarray(load_rgb(image))))) - medians).numpy()
        differ = np.round(centred) != symbols
        assert not np.any(differ & (np.abs(np.abs(centred % 1) - 0.5) > 1e-3))
        assert abs(8 * len(payload) - coded["bits"]) <= 32 * int(differ.sum())
        assert len(data) == HEADER.size + len(payload)
        # The PNG is the PyTorch model's reconstruction, to 8 bits.
        reference = np.rint(coded["x_hat"][0].clamp(0, 1).permute(1, 2, 0).numpy() * 255)
        assert np.abs(decoded.astype(int) - reference).max() <= 1


def test_decode_needs_no_checkpoint_nor_training_code(setup, tmp_path):
    file = tmp_path / "a.npcf"
    codec_cli.main(["encode", "-b", str(setup["bundles"]["fp32"]), str(setup["root"] / "a.png"), "-o", str(file)])
    script = ("import sys; from scripts import codec; codec.main(sys.argv[1:]); "
              "print(sorted(m for m in sys.modules if m.startswith(('src.', 'train_finetune', 'bench'))))")
    result = subprocess.run([sys.executable, "-c", script, "decode", "-b", str(setup["bundles"]["fp32"]), str(file),
                             "-o", str(tmp_path / "a.png")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-1500:]
    loaded = eval(result.stdout.strip().splitlines()[-1])
    decoder_modules = {"src.codec", "src.codec.bundle", "src.codec.format", "src.codec.latents", "src.codec.runtimes",
                       "src.codec.tables", "src.codec.rans", "src.codec.limits", "src.cli", "src.checkpoint",
                       "src.outputs",
                       "src.checkpoint_format"}  # src.checkpoint's payload versions: torch + src.cli, no model code
    assert set(loaded) <= decoder_modules, loaded
    assert Image.open(tmp_path / "a.png").size == (150, 110)


def other_tables_file(setup, tmp_path) -> Path:
    """A real file of another model's tables: same encoder graph, entropy coded with a second model's prior."""
    torch.manual_seed(1)
    other = build_model(make_arch(quality=1, replace="npu", replace_parts="all"))
    with torch.no_grad():
        other.entropy_bottleneck.quantiles.add_(0.7)
    other.update(force=True)
    bundle = load_bundle(setup["bundles"]["fp32"])
    tables = EntropyTables.from_entropy_bottleneck(other.entropy_bottleneck)
    manifest = dict(bundle.manifest, entropy={"sha256": tables.digest()})
    foreign = Codec(Bundle(bundle.folder, manifest, tables), parts=("encoder",))
    path = tmp_path / "other.npcf"
    path.write_bytes(foreign.encode(np.asarray(load_rgb(setup["root"] / "a.png"))))
    return path


def test_bad_files_and_images_are_one_line_refusals(setup, tmp_path, capsys):
    bundle = str(setup["bundles"]["fp32"])
    good = tmp_path / "good.npcf"
    codec_cli.main(["encode", "-b", bundle, str(setup["root"] / "b.png"), "-o", str(good)])
    data = good.read_bytes()
    cases = {
        "truncated.npcf": (data[:-5], "is truncated"),
        "header_only.npcf": (data[:20], "is truncated: 20 bytes"),
        "empty.npcf": (b"", "is truncated: 0 bytes"),
        "extended.npcf": (data + b"\0", "longer than its header says"),
        "flipped.npcf": (data[:60] + bytes([data[60] ^ 0x10]) + data[61:], "is corrupt: its CRC-32"),
        "size.npcf": (data[:21] + bytes([data[21] ^ 1]) + data[22:], "is corrupt"),
        "magic.npcf": (b"JFIF" + data[4:], "not a file of this codec"),
        "version.npcf": (data[:4] + b"\x07" + data[5:], "format version 7"),
    }
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=needle):
            codec_cli.main(["decode", "-b", bundle, str(tmp_path / name), "-o", str(tmp_path / "x.png")])
    with pytest.raises(UserError, match="made with other entropy tables"):
        codec_cli.main(["decode", "-b", bundle, str(other_tables_file(setup, tmp_path)), "-o", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
    (tmp_path / "text.png").write_text("not an image")
    for image, needle in ((tmp_path / "text.png", "cannot be read as an image"), (tmp_path / "no.png", "not found")):
        with pytest.raises(UserError, match=needle):
            codec_cli.main(["encode", "-b", bundle, str(image), "-o", str(tmp_path / "y.npcf")])
    with pytest.raises(UserError, match="not a codec bundle"):
        codec_cli.main(["decode", "-b", str(tmp_path), str(good), "-o", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as stop:
        run_cli(codec_cli.main, ["decode", "-b", bundle, str(tmp_path / "flipped.npcf"), "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "CRC-32" in err


def resigned_copy(folder: Path, out: Path, edit) -> Path:
    """A copy of a bundle whose encoder graph ``edit`` changed, with the manifest's hash updated to match."""
    shutil.copytree(folder, out)
    graph = onnx.load(str(out / "encoder.onnx"))
    edit(graph)
    onnx.save(graph, str(out / "encoder.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["encoder"]["sha256"] = file_sha256(out / "encoder.onnx")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_non_finite_latents_and_altered_bundles_are_refused(setup, tmp_path):
    def poison(graph):
        weight = next(t for t in graph.graph.initializer if len(t.dims) == 4)
        values = onnx.numpy_helper.to_array(weight).copy()
        values[0, 0, 0, 0] = np.nan
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))

    broken = resigned_copy(setup["bundles"]["fp32"], tmp_path / "broken", poison)
    with pytest.raises(UserError, match="latent values are NaN/Inf"):
        codec_cli.main(["encode", "-b", str(broken), str(setup["root"] / "a.png"), "-o", str(tmp_path / "n.npcf")])
    assert not (tmp_path / "n.npcf").exists()
    altered = tmp_path / "altered"
    shutil.copytree(setup["bundles"]["fp32"], altered)
    (altered / "decoder.onnx").write_bytes((altered / "decoder.onnx").read_bytes()[:-10])
    with pytest.raises(UserError, match="does not match the hash"):
        codec_cli.main(["audit", "-b", str(altered)])
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a codec bundle: not overwriting"):
        export_onnx.main(["--ckpt", str(setup["ckpt"]), "--bundle", str(tmp_path / "keep"), "--image",
                          str(setup["root"] / "a.png")])
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"
    qat_arch = make_arch(quality=1, replace="npu", replace_parts="all", qat=True)
    qat_model = build_model(qat_arch)
    qat_model.update(force=True)
    save_checkpoint({"state_dict": qat_model.state_dict(), "arch": qat_arch}, tmp_path / "qat.pt")
    with pytest.raises(UserError, match="QAT checkpoint was never calibrated"):
        export_onnx.main(["--ckpt", str(tmp_path / "qat.pt"), "--bundle", str(tmp_path / "qat_bundle"), "--int8",
                          str(setup["root"] / "calib"), "--precision", "w8a8"])
    assert not (tmp_path / "qat_bundle").exists()


def test_fp32_and_int8_bundles_decode_each_others_files(setup, tmp_path):
    fp32, int8 = setup["bundles"]["fp32"], setup["bundles"]["int8_subpixel"]
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["precision"]["profile"] == "w8a8"
    assert manifest["entropy"]["sha256"] == json.loads((fp32 / "manifest.json").read_text())["entropy"]["sha256"]
    image = setup["root"] / "a.png"
    fp32_file, fp32_png = encode_decode(fp32, image, tmp_path / "fp32")
    int8_file, int8_png = encode_decode(int8, image, tmp_path / "int8")
    cross = {name: encode_decode(file_bundle, image, tmp_path / name, decoder_bundle=decoder)[1]
             for name, (file_bundle, decoder) in {"fp32->int8": (fp32, int8), "int8->fp32": (int8, fp32)}.items()}
    # The INT8 decoder is really quantised, and close to the FP32 decoder on the same file.
    for same, other in ((fp32_png, cross["fp32->int8"]), (int8_png, cross["int8->fp32"])):
        diff = np.abs(same.astype(int) - other.astype(int))
        assert diff.max() > 0 and diff.mean() < 0.05 * 255
    # The INT8 encoder's symbols are the FP32 ones but for its quantisation noise (the INT8 issue's bound: < 5 %).
    coder = load_bundle(fp32).coder()
    fp32_symbols, int8_symbols = (coder.decode(unpack(f, "f")[1], *latent_size(110, 150))
                                  for f in (fp32_file, int8_file))
    assert np.mean(fp32_symbols != int8_symbols) < 0.05
    # Symbols are identical across runs and across fresh sessions of the same encoder.
    for folder, first in ((fp32, fp32_file), (int8, int8_file)):
        again = Codec(load_bundle(folder), parts=("encoder",)).encode(np.asarray(load_rgb(image)))
        assert again == first
    audit = manifest["audit"]["decoder"]["onnxruntime"]
    assert audit["integer"].get("QLinearConv", 0) == 13 and not {"Conv", "ConvTranspose"} & set(audit["float"])


def test_subpixel_rewrite_is_exact_in_fp32(setup, tmp_path):
    torch.manual_seed(0)
    for kernel, stride, padding, output_padding in ((5, 2, 2, 1), (3, 2, 1, 1), (4, 2, 1, 0), (6, 3, 2, 1)):
        layer = nn.ConvTranspose2d(5, 4, kernel, stride, padding, output_padding)
        assert can_rewrite(layer)
        x = torch.randn(1, 5, 7, 9)
        with torch.no_grad():
            expected, got = layer(x), subpixel_from_convtranspose(layer)(x)
        # One output is a sum of <= 5*ceil(K/s)^2 products of O(1) terms: FP32 reordering moves it by ~1e-6.
        assert got.shape == expected.shape and (got - expected).abs().max() < 1e-5
    assert not can_rewrite(nn.ConvTranspose2d(4, 4, 5, 2, 2, 0))  # output 2H - 1: no sub-pixel form
    model = setup["model"]
    rewritten = nn.Module()
    rewritten.g_s, rewritten.entropy_bottleneck = subpixel_rewrite(model.g_s)[0], model.entropy_bottleneck
    symbols = torch.randint(-3, 4, (1, 192, 6, 5)).float()
    path = export_module(SymbolDecoder(rewritten), symbols, tmp_path / "decoder.onnx", "symbols", "x_hat", 13)
    ops = op_histogram(path)
    assert ops.get("DepthToSpace") == 4 and "ConvTranspose" not in ops
    medians = model.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
    for runtime in RUNTIMES:
        graph = load_graph(path, runtime)
        for latent in (symbols, symbols[..., :4, :7].contiguous()):  # H/W are dynamic
            with torch.no_grad():
                expected = model.g_s(latent + medians).numpy()  # the original decoder, ConvTranspose and all
            # x_hat is O(1), a sum of ~128*9 products per layer over 4 layers: 1e-4 is ~100x FP32 reordering.
            assert np.abs(graph(latent.numpy()) - expected).max() < 1e-4, runtime
    manifest = json.loads((setup["bundles"]["int8_subpixel"] / "manifest.json").read_text())
    assert manifest["upsample"] == "subpixel" and "ConvTranspose" not in manifest["graphs"]["decoder"]["ops"]


def test_runtimes_agree_and_the_int8_convtranspose_stays_float_in_onnxruntime(setup, tmp_path):
    """The stated tolerance (docs/codec.md): FP32 decodes within 1 level (the same float sums in another order
    round to 8 bits differently only at a .5 boundary); INT8 decodes, whose integer kernels requantise in
    different orders and may differ by several levels at a few pixels, above 40 dB of each other; files within 1 %."""
    for name in ("fp32", "int8_subpixel"):
        folder = setup["bundles"][name]
        ort_file, ort_png = encode_decode(folder, setup["root"] / "b.png", tmp_path / name, "onnxruntime")
        ov_file, ov_png = encode_decode(folder, setup["root"] / "b.png", tmp_path / name, "openvino")
        assert abs(len(ov_file) - len(ort_file)) <= 0.01 * len(ort_file) + 8
        if name == "fp32":
            assert np.abs(ort_png.astype(int) - ov_png.astype(int)).max() <= 1
        assert psnr(ort_png, ov_png) > 40, name
    fp32_decoder = setup["bundles"]["fp32"] / "decoder.onnx"
    bundle = Codec(load_bundle(setup["bundles"]["fp32"]), parts=("encoder",))
    calib = [bundle.encoder(padded_input(np.asarray(load_rgb(p))))
             for p in sorted((setup["root"] / "calib").iterdir())]
    int8 = tmp_path / "decoder.int8.onnx"  # onnxruntime's defaults: QDQ, MinMax, INT8 weights per channel
    quantize_static(str(prepared(fp32_decoder, tmp_path)), str(int8), ArrayReader("symbols", calib),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    ort_audit = runtime_audit(int8, "onnxruntime")
    assert ort_audit["float"].get("ConvTranspose") == 4 and ort_audit["integer"].get("QLinearConv", 0) == 9
    ov_audit = runtime_audit(int8, "openvino")  # which of them OpenVINO runs in INT8 depends on the CPU
    assert sum(ov_audit[kind].get("Deconvolution", 0) for kind in ("integer", "float")) == 4


def test_bundle_of_a_qat_checkpoint_carries_its_scales(qat_run, coco_root, tmp_path):
    """(Here, not in test_qat.py: a bundle verifies on OpenVINO, and run.sh keeps OpenVINO in its own process.)"""
    ckpt, _ = qat_run
    bundle = export_onnx.main(["--ckpt", str(ckpt), "--bundle", str(tmp_path / "bundle"), "--int8",
                               str(coco_root / "val2017"), "--precision", "w8a8"])
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["precision"]["profile"] == "w8a8" and "QAT" in manifest["precision"]["scales"]
    assert bundle["manifest"]["verification"]
    with pytest.raises(UserError, match="trained for w8a8"):
        export_onnx.main(["--ckpt", str(ckpt), "--bundle", str(tmp_path / "b2"), "--int8",
                          str(coco_root / "val2017"), "--precision", "a16w8"])
