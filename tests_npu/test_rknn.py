"""The RK3588 path: ``targets/rknn/worker.py`` run in ``.venv-rknn`` on a small NPU model's symbol graphs.

Runs in the project's ``.venv``; the worker runs in its own venv as the orchestrator calls it (a job file, one
subprocess). The graphs are those of ``src.int8.symbol_graphs`` for a quality-1 NPU model at 64x64 with
``--pretrained false`` weights, two changes made so the test can fail: the NPU blocks' zero-initialised weights
get noise (the toolkit folds a zero branch away, leaving nothing of the block to place), and g_a's last layer is
scaled so that the symbols span a few integers instead of rounding to 0.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from src.quant.ptq import run as run_graph, session
from src.quant.symbols import symbol_graphs
from src.model_factory import build_model, make_arch

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv-rknn" / "bin" / "python"
WORKER = REPO / "targets" / "rknn" / "worker.py"
SIZE = 64
ROW = re.compile(r"^D RKNN: \[[\d:.]+\]\s+\d+\s+(\S+)\s+\S+\s+(NPU|CPU)\s")


@pytest.fixture(scope="module", autouse=True)
def toolkit_venv():
    if not PYTHON.exists():
        pytest.fail("no .venv-rknn: ./run.sh npu-setup rknn (targets/rknn/requirements.txt, then "
                    "requirements-nodeps.txt with --no-deps)")


def small_graphs(kind: str, folder: Path) -> dict:
    torch.manual_seed(0)
    model = build_model(make_arch(quality=1, replace=kind)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("g_a", "g_s")) and not param.abs().max():
                param.add_(0.05 * torch.randn_like(param))
        model.g_a[-1].weight.mul_(40.0)
        model.g_a[-1].bias.mul_(40.0)
    model.update(force=True)
    return symbol_graphs(model, torch.rand(1, 3, SIZE, SIZE), folder)


def write_job(graphs: dict, folder: Path, out_dir: Path, parts=("encoder", "decoder"), **changes) -> Path:
    rng = np.random.default_rng(1)
    images = [rng.random((1, 3, SIZE, SIZE), dtype=np.float32) for _ in range(3)]
    symbols = [run_graph(session(graphs["encoder"]), image) for image in images]
    for name, values in (("enc_calib", images[:2]), ("enc_eval", images[2:]), ("dec_calib", symbols[:2]),
                         ("dec_eval", symbols[2:])):
        np.savez(folder / f"{name}.npz", *values)
    spec = {"encoder": {"onnx": str(graphs["encoder_centred"]), "input": "x", "output": "symbols",
                        "calibration": str(folder / "enc_calib.npz"), "eval": str(folder / "enc_eval.npz")},
            "decoder": {"onnx": str(graphs["decoder"]), "input": "symbols", "output": "x_hat",
                        "calibration": str(folder / "dec_calib.npz"), "eval": str(folder / "dec_eval.npz")}}
    job = {"target": "rk3588", "precision": "w8a8", "out_dir": str(out_dir),
           "parts": {p: spec[p] for p in parts}, **changes}
    path = folder / "job.json"
    path.write_text(json.dumps(job))
    return path


def worker(job: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), str(WORKER), str(job)], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def npu_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rknn_npu")
    graphs = small_graphs("npu", folder)
    out_dir = folder / "out" / "rk3588-w8a8"
    job = write_job(graphs, folder, out_dir)
    spec = json.loads(job.read_text())
    spec["parts"]["encoder"]["tensor_ranges"] = {"/g_a/g_a.0/Conv_output_0": [-1.5, 1.25, 8], "/not/in/graph": [0, 1, 8]}
    job.write_text(json.dumps(spec))
    done = worker(job)
    assert done.returncode == 0, done.stderr
    return {"graphs": graphs, "folder": folder, "out": out_dir, "stdout": done.stdout,
            "report": json.loads((out_dir / "report.json").read_text())}


def toolkit_table(log: Path) -> list:
    """(op, target) rows of the compiler's last layer table, read straight from its log."""
    text = log.read_text(errors="replace")
    table = text[text.rfind("Network Layer Information Table"):text.rfind("Feature Tensor Information Table")]
    return [m.groups() for m in map(ROW.match, table.splitlines()) if m]


def test_compile_path_writes_artefacts_and_simulator_outputs(npu_run):
    out, report = npu_run["out"], npu_run["report"]
    assert report["target"] == "rk3588" and report["toolchain"] == {"name": "rknn-toolkit2", "version": "2.5.0"}
    for part, shape in (("encoder", (1, 192, SIZE // 16, SIZE // 16)), ("decoder", (1, 3, SIZE, SIZE))):
        assert (out / report["parts"][part]["artefact"]).stat().st_size > 100_000
        with np.load(out / f"{part}_outputs.npz") as outputs:
            assert outputs["arr_0"].shape == shape and outputs["arr_0"].dtype == np.float32
    assert not list(out.parent.glob(".rk3588-w8a8.*")), "the temporary folder is left behind"


def test_report_counts_are_the_compilers_own(npu_run):
    for part, entry in npu_run["report"]["parts"].items():
        rows = [(op, target) for op, target in toolkit_table(npu_run["out"] / entry["toolkit_log"])
                if op not in ("InputOperator", "OutputOperator")]
        assert entry["ops_total"] == len(rows) > 10
        assert entry["ops_npu"] == sum(target == "NPU" for _op, target in rows)
        assert len(entry["fallbacks"]) == entry["ops_total"] - entry["ops_npu"]
        assert entry["estimates"]["cycles_total"] > 0 and entry["estimates"]["weight_memory_kb"] > 0
    # the NPU model compiles onto the NPU whole: ECA's pool/reshape, the Conv+Clip gates, ConvTranspose included
    assert all(not e["fallbacks"] for e in npu_run["report"]["parts"].values())
    layers = {layer["op"] for layer in npu_run["report"]["parts"]["decoder"]["layers"]}
    assert "ConvTranspose" in layers


def test_target_encoder_outputs_integer_symbols(npu_run):
    symbols = np.load(npu_run["out"] / "encoder_outputs.npz")["arr_0"]
    assert np.array_equal(symbols, np.round(symbols)), "the symbol interface (scale 1, zero point 0) was lost"
    assert np.abs(symbols).max() >= 3
    reference = run_graph(session(npu_run["graphs"]["encoder"]), np.load(npu_run["folder"] / "enc_eval.npz")["arr_0"])
    assert (symbols == reference).mean() > 0.8 and np.abs(symbols - reference).max() <= 2
    quantisation = npu_run["report"]["parts"]["encoder"]["quantisation"]
    assert quantisation["symbols_max_distance_to_integer"] == 0
    assert quantisation["carried"] == ["/g_a/g_a.0/Conv_output_0", "symbols_int8"]  # the job's range, the interface
    assert "/not/in/graph" in quantisation["lost"]


def test_static_graph_is_exact_in_float(npu_run, tmp_path):
    """The worker's graph preparation (static shape, folded constants, ConvTranspose output_padding as a pad)."""
    script = ("import sys, numpy as np, onnxruntime as ort; sys.path.insert(0, sys.argv[1]); import worker;"
              "g = worker.static_graph(sys.argv[2], 'symbols', (1, 192, 4, 4), worker.Path(sys.argv[3]));"
              "x = np.random.default_rng(0).normal(0, 3, (1, 192, 4, 4)).astype(np.float32);"
              "run = lambda p: ort.InferenceSession(str(p), providers=['CPUExecutionProvider']).run(None, {'symbols': x})[0];"
              "import onnx; assert not any(a.name == 'output_padding' for n in onnx.load(str(g)).graph.node for a in n.attribute);"
              "print(float(np.abs(run(g) - run(sys.argv[2])).max()))")
    done = subprocess.run([str(PYTHON), "-c", script, str(WORKER.parent), str(npu_run["graphs"]["decoder"]),
                           str(tmp_path / "static.onnx")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 1e-5


def test_tile_partials_add_up_to_the_convolution(npu_run, tmp_path):
    """The worker's rebuild of the toolkit's channel tiles: 2 or 3 partial sums (bias on the first) that add up to
    the ONNX Conv / ConvTranspose, and a running sum that is the first two."""
    script = ("import sys, numpy as np, onnx; sys.path.insert(0, sys.argv[1]); import worker;"
              "g = onnx.load(sys.argv[2]); node = next(n for n in g.graph.node if n.output[0] == sys.argv[3]);"
              "shape = [d.dim_value for d in g.graph.input[0].type.tensor_type.shape.dim];"
              "x = np.random.default_rng(0).normal(0.5, 2, shape).astype(np.float32);"
              "values = next(iter(worker.ConvInputs(g, [node.input[0], node.output[0]], [x]))); worst = 0.0\n"
              "for count in (2, 3):\n"
              " tiles = worker.TilePartials(g, node, count); parts = tiles.run(values[node.input[0]])\n"
              " assert len(parts) == count\n"
              " worst = max(worst, float(np.abs(sum(parts) - values[node.output[0]]).max()),"
              " float(np.abs(tiles.value('t_tile0_conv_add', parts) - parts[0] - parts[1]).max()))\n"
              "print(worst)")
    for part, conv in (("encoder", "/g_a/g_a.2/Conv_output_0"), ("decoder", "/g_s/g_s.0/ConvTranspose_output_0")):
        source = onnx_static(npu_run["graphs"]["encoder_centred" if part == "encoder" else part], part, tmp_path)
        done = subprocess.run([str(PYTHON), "-c", script, str(WORKER.parent), str(source), conv],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert float(done.stdout) < 1e-4


def onnx_static(graph: Path, part: str, folder: Path) -> Path:
    """The part's graph as the worker hands it to the toolkit (static shape, folded constants)."""
    name, shape = ("x", (1, 3, SIZE, SIZE)) if part == "encoder" else ("symbols", (1, 192, SIZE // 16, SIZE // 16))
    out = folder / f"{part}_static.onnx"
    done = subprocess.run([str(PYTHON), "-c", "import sys; sys.path.insert(0, sys.argv[1]); import worker; "
                           "worker.static_graph(sys.argv[2], sys.argv[3], tuple(map(int, sys.argv[4:8])), "
                           "worker.Path(sys.argv[8]))", str(WORKER.parent), str(graph), name, *map(str, shape),
                           str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def test_the_toolkits_own_tensors_get_the_project_rule(npu_run):
    """The toolkit cuts the 128-channel 5x5 (transposed) convolutions into channel tiles fed by a Split; every
    Split output and every tile's partial sum is given a range (none left to the toolkit's own min/max, which
    each rebuilt partial must match first), and the toolkit's log shows them changed."""
    for part, entry in npu_run["report"]["parts"].items():
        toolkit = entry["quantisation"]["toolkit_tensors"]
        given, log = toolkit["given_ranges"], (npu_run["out"] / entry["toolkit_log"]).read_text(errors="replace")
        assert toolkit["not_rebuilt"] == []
        assert sum("_split" in name for name in given) >= 6 and sum("_tile" in name for name in given) >= 6
        for name in given:
            if "_tile" in name:  # the project's MSE range of a partial is narrower than its min/max
                assert f"quantize_parameters['{name}'] were changed" in log, name


def test_gdn_encoder_reports_its_cpu_ops(tmp_path):
    """Also the compile-only job (no eval arrays: scripts.npu_targets without --eval_dir): compiled and reported."""
    graphs = small_graphs("none", tmp_path)
    out_dir = tmp_path / "out" / "rk3588-w8a8"
    job = write_job(graphs, tmp_path, out_dir, parts=("encoder",))
    spec = json.loads(job.read_text())
    del spec["parts"]["encoder"]["eval"]
    job.write_text(json.dumps(spec))
    done = worker(job)
    assert done.returncode == 0, done.stderr
    entry = json.loads((out_dir / "report.json").read_text())["parts"]["encoder"]
    assert (out_dir / entry["artefact"]).stat().st_size > 0
    rows = toolkit_table(out_dir / entry["toolkit_log"])
    on_cpu = [op for op, target in rows if target == "CPU" and op not in ("InputOperator", "OutputOperator")]
    assert on_cpu and sorted(f["op"] for f in entry["fallbacks"]) == sorted(on_cpu)
    assert {"Sqrt", "Div"} <= set(on_cpu)


def test_refusals_are_one_line_and_keep_earlier_artefacts(npu_run, tmp_path):
    out_dir = tmp_path / "out" / "rk3588-w8a8"
    out_dir.mkdir(parents=True)
    (out_dir / "encoder.rknn").write_bytes(b"earlier artefact")
    (out_dir / "report.json").write_text('{"earlier": true}')
    bad_target = worker(write_job(npu_run["graphs"], tmp_path, out_dir, parts=("encoder",), target="rk9999"))
    # calibration arrays the graph cannot take: refused by the worker at the graph's shape (no compile_shape) ...
    job = write_job(npu_run["graphs"], tmp_path, out_dir, parts=("encoder",))
    np.savez(tmp_path / "enc_calib.npz", np.zeros((1, 4, SIZE, SIZE), np.float32))
    bad_calibration = worker(job)
    # ... and by the toolkit itself when the compiled shape is given
    spec = json.loads(job.read_text())
    spec["parts"]["encoder"]["compile_shape"] = [1, 3, SIZE, SIZE]
    job.write_text(json.dumps(spec))
    toolkit_refusal = worker(job)
    for done in (bad_target, bad_calibration, toolkit_refusal):
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")
        assert "Traceback" not in done.stderr
    assert "rk9999" in bad_target.stderr and "[1, 4, 64, 64]" in bad_calibration.stderr
    assert "rknn-toolkit2" in toolkit_refusal.stderr and "shape" in toolkit_refusal.stderr
    assert (out_dir / "encoder.rknn").read_bytes() == b"earlier artefact"
    assert json.loads((out_dir / "report.json").read_text()) == {"earlier": True}
    assert sorted(p.name for p in out_dir.iterdir()) == ["encoder.rknn", "report.json"]
    assert [p.name for p in out_dir.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
