"""The Arm Ethos-U path end to end on a small model: ONNX -> int8 / 16x8 TFLite -> Vela, the LiteRT round trip.

Needs ``.venv-ethosu`` (``./run.sh npu-test`` creates it first); not collected by ``./run.sh test``. A quality-1
NPU model with random weights (``--pretrained false``), its last encoder convolution scaled so the symbols span
many integers, compiled at 64x64 for the U55 and the U85 in w8a8 and 16x8.
"""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image

from scripts import npu_targets
from src.checkpoint import save_checkpoint
from src.images import load_rgb
from src.model_factory import build_model, make_arch
from src.sample_photos import COLOR_PHOTOS, skimage_photos
from src.targets.toolchains import installed, venv_dir
from tests.conftest import one_line_error

TARGETS = ("ethos-u55-256", "ethos-u85-256")
PRECISIONS = ("w8a8", "a16w8")
SIDE = 64

pytestmark = pytest.mark.skipif(not installed("ethosu"), reason="run ./run.sh npu-test (it creates .venv-ethosu)")


def photos(folder: Path, paths) -> Path:
    folder.mkdir(parents=True)
    for index, path in enumerate(paths):
        image = load_rgb(path)
        image.thumbnail((SIDE * 2, SIDE * 2))
        image.crop((0, 0, SIDE, SIDE)).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ethosu")
    torch.manual_seed(0)
    arch = make_arch(quality=1, replace="npu")
    model = build_model(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "entropy_bottleneck" not in name:
                param.copy_(torch.randn_like(param) * (0.5 / max(1, param[0].numel()) ** 0.5))
        model.g_a[-1].weight.mul_(40.0)
    model.update(force=True)
    save_checkpoint({"state_dict": model.state_dict(), "arch": arch}, root / "npu.pt")
    shipped = skimage_photos(COLOR_PHOTOS)
    base = ["--ckpt", str(root / "npu.pt"), "--calib_dir", str(photos(root / "calib", shipped[:5])),
            "--eval_dir", str(photos(root / "eval", shipped[5:7])), "--input_size", f"{SIDE}x{SIDE}",
            "--out", str(root / "out")]
    rows = npu_targets.main(base + ["--targets", *TARGETS, "--precision", *PRECISIONS])
    return {"root": root, "out": root / "out", "rows": rows, "base": base}


def result(run, target, precision):
    return json.loads((run["out"] / "npu_convtranspose" / f"{target}-{precision}" / "report.json").read_text())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_operator_on_the_npu_and_counts_are_velas(run, target, precision):
    folder = run["out"] / "npu_convtranspose" / f"{target}-{precision}"
    report = result(run, target, precision)
    for part in ("encoder", "decoder"):
        got = report["parts"][part]
        assert got["fallbacks"] == [] and got["ops_npu"] == got["ops_total"] > 5, (part, got["fallbacks"])
        log = (folder / f"{part}_vela.log").read_text()
        cpu, npu = (int(re.search(rf"{kind} operators = (\d+)", log)[1]) for kind in ("CPU", "NPU"))
        assert (got["ops_total"] - got["ops_npu"], got["ops_npu"]) == (cpu, npu)
        summary = (folder / f"{part}_vela_summary.csv").read_text().splitlines()
        row = dict(zip(summary[0].split(","), summary[1].split(",")))
        assert got["estimates"]["latency_ms"] == pytest.approx(1000 * float(row["inference_time"]))
        assert got["estimates"]["macs"] == float(row["nn_macs"]) > 0
        assert got["input_shape"] == ([1, 3, SIDE, SIDE] if part == "encoder" else [1, 192, SIDE // 16, SIDE // 16])
        assert (folder / f"{part}_vela.tflite").stat().st_size > 0 and (folder / f"{part}_int8.tflite").is_file()
    assert target.replace("-", "_").upper()[:13] in (folder / "encoder_vela.log").read_text().upper().replace("-", "_")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_target_encoder_emits_the_codec_symbols(run, precision):
    """Integer symbols at scale 1 / zero point 0 out of the target encoder, coded with real bits."""
    report = result(run, TARGETS[0], precision)
    rt = report["roundtrip"]
    assert rt["symbols"]["integer"] and rt["symbols"]["max"] - rt["symbols"]["min"] >= 4, rt["symbols"]
    model = run["out"] / "npu_convtranspose" / f"{TARGETS[0]}-{precision}" / "encoder_int8.tflite"
    probe = ("from ai_edge_litert.interpreter import Interpreter; import sys; "
             "i = Interpreter(model_path=sys.argv[1]); d = i.get_output_details()[0]; "
             "print(d['dtype'].__name__, *d['quantization'])")
    out = subprocess.run([str(venv_dir("ethosu") / "bin" / "python"), "-c", probe, str(model)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [("int8" if precision == "w8a8" else "int16"), "1.0", "0"]
    assert rt["target"]["bpp"] == pytest.approx(rt["fp32"]["bpp"], rel=0.25)


def test_target_numerics_shared_across_ethos_u_variants(run):
    """U55 and U85 compile the same int8 model (Vela keeps its numerics): the same round trip."""
    u55, u85 = (result(run, t, "w8a8")["roundtrip"]["target"] for t in TARGETS)
    assert u55 == u85


SCALES_SNIPPET = """
import json, sys
from tensorflow.lite.tools import flatbuffer_utils
model = flatbuffer_utils.read_model(sys.argv[1])
graph = model.subgraphs[0]
ends = set(graph.inputs) | set(graph.outputs)
constant = lambda t: model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data) > 0
print(json.dumps({t.name.decode(): [float(t.quantization.scale[0]), i in ends] for i, t in enumerate(graph.tensors)
                  if t.type == 9 and not constant(t) and t.quantization is not None
                  and t.quantization.scale is not None and len(t.quantization.scale) == 1}))
"""


def activation_scales(model: Path) -> dict:
    """{tensor name: [scale, is a graph input/output]} of the int8 activations of a TFLite model (read in its venv)."""
    out = subprocess.run([str(venv_dir("ethosu") / "bin" / "python"), "-c", SCALES_SNIPPET, str(model)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_project_ranges_reach_the_int8_model(run):
    """--calib_method mse (the default) writes the project's ranges into TFLite's calibration before its quantiser
    runs; minmax is TFLite's own calibration. The MSE ranges lie inside min/max, several strictly (a range the
    quantiser never saw would leave every scale equal), and the codec's interface is set the same in both."""
    base = run["base"][:run["base"].index("--out")]
    npu_targets.main(base + ["--out", str(run["root"] / "out_minmax"), "--targets", TARGETS[0],
                             "--precision", "w8a8", "--calib_method", "minmax"])
    mse_folder = run["out"] / "npu_convtranspose" / f"{TARGETS[0]}-w8a8"
    minmax_folder = run["root"] / "out_minmax" / "npu_convtranspose" / f"{TARGETS[0]}-w8a8"
    for part in ("encoder", "decoder"):
        mse, minmax = (activation_scales(folder / f"{part}_int8.tflite") for folder in (mse_folder, minmax_folder))
        assert mse.keys() == minmax.keys()
        inner = [name for name, (_, end) in mse.items() if not end]
        assert all(mse[n][0] <= minmax[n][0] * (1 + 1e-6) for n in inner), part
        assert sum(mse[n][0] < 0.98 * minmax[n][0] for n in inner) >= 2, (part, mse, minmax)
        assert all(mse[n] == minmax[n] for n in mse if mse[n][1]), part
    carried = result(run, TARGETS[0], "w8a8")["parts"]["encoder"]["quantisation"]["carried"]
    assert any("'mse' ranges" in line for line in carried), carried


def test_a_graph_vela_cannot_place_is_one_line_and_keeps_the_earlier_artefacts(run, capsys):
    """The decoder's ConvTransposes as trained: Vela leaves them on the CPU with its reason. Recorded with
    --allow_fallbacks true; refused (one line) without, and the recorded folder is left as it was."""
    flags = run["base"] + ["--targets", TARGETS[0], "--precision", "w8a8", "--upsample", "as_trained"]
    npu_targets.main(flags + ["--allow_fallbacks", "true"])
    folder = run["out"] / "npu_as_trained" / f"{TARGETS[0]}-w8a8"
    recorded = json.loads((folder / "report.json").read_text())
    fallbacks = recorded["parts"]["decoder"]["fallbacks"]
    assert fallbacks and all(f["op"] == "TRANSPOSE_CONV" and "Unsupported IFM/OFM shapes" in f["reason"]
                             for f in fallbacks), fallbacks
    assert recorded["parts"]["decoder"]["ops_npu"] == recorded["parts"]["decoder"]["ops_total"] - len(fallbacks)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    err = one_line_error(npu_targets.main, flags, capsys)
    assert "TRANSPOSE_CONV" in err and "Unsupported IFM/OFM shapes" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_worker_error_is_one_line_exit_2(run, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"target": "ethos-u55-256", "precision": "w8a8", "out_dir": str(tmp_path / "o"),
                               "parts": {"encoder": {"onnx": str(tmp_path / "missing.onnx"), "input": "x",
                                                     "output": "symbols",
                                                     "calibration": str(tmp_path / "missing.npz")}}}))
    done = subprocess.run([str(venv_dir("ethosu") / "bin" / "python"), "targets/ethosu/worker.py", str(job)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()


CONVERT_SNIPPET = """
import sys, tempfile, numpy as np
from pathlib import Path
sys.path.insert(0, "targets/ethosu")
import worker
array = np.load(sys.argv[2])
try:
    worker.saved_model(sys.argv[1], "x", list(array.shape), [array], Path(tempfile.mkdtemp()))
    print("converted")
except worker.WorkerError as err:
    print(f"error: {err}")
"""


@pytest.mark.parametrize("form", ["as_trained", "target"])
def test_onnx2tf_layout_errors_are_caught_and_the_decoder_form_avoids_them(form, tmp_path):
    """A decoder block whose channel count equals its map's height, then the SAME-padded ConvTranspose (the NPU
    blocks' decoder at 768x512 in small): onnx2tf mislays the block's residual Add and the worker's float check
    refuses the model; the target form (residual as Sub, gate without the Mul by 1) converts and passes it."""
    from src.npu_blocks import GDNishLiteDec
    from src.quant.symbols import export_module, gates_as_clips
    from src.targets.rewrites import same_padded_rewrite, subtracted_residual_rewrite
    from tests.test_targets import randomised
    torch.manual_seed(0)
    decoder = randomised(nn.Sequential(GDNishLiteDec(8), nn.ConvTranspose2d(8, 8, 5, 2, 2, output_padding=1)))
    decoder = same_padded_rewrite(decoder)[0]
    if form == "target":
        decoder = subtracted_residual_rewrite(decoder)[0]
    x = torch.randn(1, 8, 8, 12)
    graph = export_module(gates_as_clips(decoder), x, tmp_path / "decoder.onnx", "x", "y", 13)
    np.save(tmp_path / "x.npy", x.numpy())
    done = subprocess.run([str(venv_dir("ethosu") / "bin" / "python"), "-c", CONVERT_SNIPPET, str(graph),
                           str(tmp_path / "x.npy")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    verdict = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    if form == "as_trained":
        assert verdict.startswith("error: onnx2tf's float model") and "layout error" in verdict, verdict
    else:
        assert verdict == "converted", verdict
