"""NPU targets, the project side (no toolchain needed): the rewrites' float exactness, the replayed round trip,
the report's rows, and every refusal that happens before a toolchain runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from scripts import npu_setup, npu_targets
from src.checkpoint import save_checkpoint
from src.quant.ptq import SymbolCodec, mean_points
from src.quant.symbols import symbol_graphs
from src.model_factory import build_model, make_arch
from src.npu_blocks import ECAGate
from src.targets import report, toolchains
from src.targets.jobs import padded
from src.targets.registry import by_form, resolve_targets
from src.targets.rewrites import (ECA_MEANS, BandedECAGate, can_pad_to_same, same_padded_convtranspose,
                                  same_padded_rewrite, target_model)
from src.targets.roundtrip import ReplayCodec, code_symbols, key
from tests.conftest import one_line_error, photo_paths
from src.images import image_tensor, load_rgb


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (the identity init would make the blocks' insides vanish and any rewrite look exact)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "entropy_bottleneck" not in name:
                param.copy_(torch.randn_like(param) * (0.5 / max(1, param[0].numel()) ** 0.5))
    return model.eval()


@pytest.mark.parametrize("kernel, stride, padding, output_padding", [(5, 2, 2, 1), (3, 2, 1, 1), (4, 2, 1, 0)])
def test_same_padded_convtranspose_is_exact(kernel, stride, padding, output_padding):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(6, 4, kernel, stride=stride, padding=padding, output_padding=output_padding)
    assert can_pad_to_same(layer)
    padded_layer = same_padded_convtranspose(layer)
    assert padded_layer.kernel_size == (2 * padding + stride,) * 2 and padded_layer.output_padding == (0, 0)
    x = torch.randn(2, 6, 7, 9)
    assert torch.equal(layer(x), padded_layer(x))


def test_convtranspose_that_cannot_be_padded_is_left_alone():
    odd = nn.ConvTranspose2d(4, 4, 5, stride=2, padding=2)  # output 2*in - 1: not stride x input
    assert not can_pad_to_same(odd)
    module, count = same_padded_rewrite(nn.Sequential(odd))
    assert count == 0 and module[0].kernel_size == (5, 5)


def test_banded_eca_gate_is_exact():
    torch.manual_seed(0)
    gate = ECAGate(5, init_identity=False)
    nn.init.normal_(gate.conv.weight)
    nn.init.normal_(gate.conv.bias)
    x = torch.randn(2, 16, 6, 5)
    for mean in ECA_MEANS:
        torch.testing.assert_close(BandedECAGate(gate, 16, mean)(x), gate(x), rtol=0, atol=1e-5)


def test_each_target_gets_its_own_eca_mean():
    """Vela limits the elements one MEAN reduces, so Ethos-U gets one-axis means; RKNN-Toolkit2 put Transposes on
    the CPU around those, so RK3588 gets the mean over H and W in one ReduceMean (the graphs: ``reduce_mean_axes``
    in the tests that export them)."""
    groups = by_form(resolve_targets(["ethos-u55-256", "rk3588", "ethos-u85-256"]))
    assert {mean: [t.name for t in group] for mean, group in groups.items()} == {
        "separable": ["ethos-u55-256", "ethos-u85-256"], "joint": ["rk3588"]}


def reduce_mean_axes(graph) -> list:
    """The axes of each ReduceMean of an ONNX graph, in order (opset 18: an input; earlier: an attribute)."""
    import onnx
    constants = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in graph.initializer}
    constants.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t).tolist()
                      for n in graph.node if n.op_type == "Constant"})
    return [constants.get(n.input[1]) if len(n.input) > 1
            else [list(a.ints) for a in n.attribute if a.name == "axes"][0]
            for n in graph.node if n.op_type == "ReduceMean"]


@pytest.mark.parametrize("replace", ["npu", "relu", "none"])
@pytest.mark.parametrize("upsample", ["convtranspose", "subpixel", "as_trained"])
def test_target_model_computes_the_same_function(replace, upsample):
    model = randomised(build_model(make_arch(quality=1, replace=replace)))
    rewritten = target_model(model, upsample)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        y = model.g_a(x)
        torch.testing.assert_close(rewritten.g_a(x), y, rtol=0, atol=1e-4 * float(y.abs().max()))
        x_hat = model.g_s(y)
        torch.testing.assert_close(rewritten.g_s(y), x_hat, rtol=0, atol=1e-4 * float(x_hat.abs().max()))
    kinds = [type(m).__name__ for m in rewritten.modules()]
    assert not set(kinds) & {"ECAGate", "GDN"}
    assert kinds.count("SubtractedResidual") == (3 if replace == "npu" else 0)  # g_s: three residual blocks
    if upsample == "convtranspose":
        assert all(m.kernel_size == (6, 6) for m in rewritten.g_s.modules() if isinstance(m, nn.ConvTranspose2d))
    if upsample == "subpixel":
        assert not any(isinstance(m, nn.ConvTranspose2d) for m in rewritten.g_s.modules())


@pytest.mark.parametrize("replace", ["npu", "none"])
def test_target_graphs_have_no_shape_arithmetic(replace, tmp_path):
    """ECA's reshapes and GDN's run-time parametrisation are gone: the graphs a converter sees are static from
    their input on."""
    import onnx
    model = randomised(build_model(make_arch(quality=1, replace=replace)))
    model.update(force=True)
    graphs = symbol_graphs(target_model(model, "convtranspose"), torch.rand(1, 3, 64, 64), tmp_path)
    for path in (graphs["encoder_centred"], graphs["decoder"]):
        graph = onnx.load(str(path)).graph
        ops = {node.op_type for node in graph.node}
        assert not ops & {"Shape", "Reshape", "Gather", "HardSigmoid", "Pow"}, ops
        if replace == "npu" and path == graphs["encoder_centred"]:  # three ECA gates, the Ethos-U form's mean
            assert reduce_mean_axes(graph) == [[2], [3]] * 3
        # GDN's rsqrt as Div(one, Sqrt) with a 4-D one: onnx2tf fails on a scalar numerator for square images
        ranks = {t.name: len(t.dims) for t in graph.initializer}
        ranks.update({n.output[0]: len(a.t.dims) for n in graph.node if n.op_type == "Constant" for a in n.attribute})
        ranks.update({n.output[0]: ranks.get(n.input[0]) for n in graph.node if n.op_type == "Identity"})  # shared
        divides = [n for n in graph.node if n.op_type == "Div"]
        assert len(divides) == (3 if replace == "none" and path == graphs["encoder_centred"] else 0)
        assert all(ranks.get(n.input[0]) == 4 for n in divides), [ranks.get(n.input[0]) for n in divides]
        # onnx2tf mislays a sum of two activations before a ConvTranspose (SubtractedResidual), and turns a Mul by
        # a constant 1 into a bare 1.0 on square maps: neither is left in the decoder
        constants = set(ranks)
        values = {n.output[0]: onnx.numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant"
                  for a in n.attribute}
        values.update({t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer})
        if path == graphs["decoder"]:
            sums = [n for n in graph.node if n.op_type == "Add" and not set(n.input) & constants]
            assert not sums, [n.name for n in sums]
            assert sum(n.op_type == "Sub" for n in graph.node) == (3 if replace == "npu" else 0)
        trivial = [n.name for n in graph.node for i in n.input if i in values and values[i].size == 1
                   and float(values[i].reshape(())) == {"Mul": 1.0, "Add": 0.0}.get(n.op_type)]
        assert not trivial, trivial


def small_images(count: int, offset: int = 0, side: int = 96):
    images = []
    for path in photo_paths()[offset:offset + count]:
        image = load_rgb(path)
        image.thumbnail((side, side))
        images.append(image_tensor(image))
    return images


def test_replayed_round_trip_is_the_symbol_codec_round_trip(tmp_path):
    """The round trip a target's outputs go through (coded symbols, replayed decoder outputs) measures exactly what
    ``SymbolCodec`` measures when the 'target' outputs are the FP32 graphs' own."""
    import onnxruntime as ort
    model = randomised(build_model(make_arch(quality=1, replace="npu")))
    with torch.no_grad():
        model.g_a[-1].weight.mul_(40.0)  # symbols over many integers
    model.update(force=True)
    images = small_images(2)
    graphs = symbol_graphs(model, torch.from_numpy(padded(images)[0]), tmp_path)
    encoder, decoder = (ort.InferenceSession(str(graphs[p])) for p in ("encoder", "decoder"))
    arrays = padded(images)
    symbols = [encoder.run(None, {"x": a})[0] for a in arrays]
    assert max(float(np.abs(s).max()) for s in symbols) > 3
    coded = [code_symbols(model.entropy_bottleneck, s) for s in symbols]
    x_hats = [decoder.run(None, {"symbols": d})[0] for _, d in coded]
    replay = ReplayCodec(model.entropy_bottleneck, {key(a): s for a, (s, _) in zip(arrays, coded)},
                         {key(d): x for (_, d), x in zip(coded, x_hats)})
    expected = mean_points(SymbolCodec(graphs["encoder"], graphs["decoder"], model.entropy_bottleneck), images, 64)[0]
    assert mean_points(replay, images, 64)[0] == pytest.approx(expected, rel=1e-6)


def test_w8a8_jobs_carry_the_project_ranges_by_onnx_name(tmp_path, monkeypatch):
    """Each w8a8 part a worker is given holds the project's plan (``tensor_ranges``: ONNX tensor -> [low, high, 8],
    the ranges ``quantise_pair`` quantises with), named as in the graph it is sent; the symbols are not among them
    (the interface sets them) and a16w8 parts carry none. The job names the range method."""
    import onnx
    from src.quant.ptq import plan
    from src.quant.symbols import ENCODER_OUTPUT
    from src.targets import study
    model = randomised(build_model(make_arch(quality=1, replace="npu")))
    model.update(force=True)
    prep = study.prepare(model, "m", "convtranspose", small_images(4), [], ["w8a8"], tmp_path / "prep", "mse",
                         "joint")
    jobs_seen = []
    monkeypatch.setattr(study, "run_worker", lambda toolchain, job: jobs_seen.append(json.loads(job.read_text())))
    target = resolve_targets(["rk3588"])[0]
    for precision in ("w8a8", "a16w8"):
        study.run_part(prep, target, precision, "encoder", {"onnx": str(prep.graphs["encoder_centred"])},
                       tmp_path / precision, tmp_path)
    w8a8, a16w8 = (job["parts"]["encoder"] for job in jobs_seen)
    graph = onnx.load(str(prep.graphs["encoder_centred"])).graph
    names = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    ranges = w8a8["tensor_ranges"]
    assert len(ranges) > 10 and set(ranges) <= names and ENCODER_OUTPUT not in ranges
    assert all(low <= 0.0 <= high and bits == 8 for low, high, bits in ranges.values())
    assert "tensor_ranges" not in a16w8 and jobs_seen[0]["range_method"] == "mse"
    assert reduce_mean_axes(graph) == [[2, 3]] * 3  # prepared in RK3588's form: ECA's mean in one ReduceMean


def test_a_qat_models_trained_scales_reach_the_rk3588_job(qat_run, tmp_path, monkeypatch):
    """A QAT checkpoint's w8a8 job for a toolkit that takes ranges by ONNX name holds the ranges its trained scale
    and zero point span at each of its sites; the tensors the target form adds (ECA's mean as a ReduceMean, the
    decoder's residual as a Sub) keep the PTQ rule and are named; the reports say which target got what."""
    from src.quant.fake_quant import activation_quantisers
    from src.targets import study
    model, _ = npu_targets.load_model(str(qat_run[0]))
    prep = study.prepare(model, "q", "convtranspose", small_images(4), [], ["w8a8"], tmp_path / "prep", "mse",
                         "joint")
    jobs_seen = []
    monkeypatch.setattr(study, "run_worker", lambda toolchain, job: jobs_seen.append(json.loads(job.read_text())))
    rk3588, u55 = resolve_targets(["rk3588", "ethos-u55-256"])
    study.run_part(prep, rk3588, "w8a8", "encoder", {"onnx": str(prep.graphs["encoder_centred"])}, tmp_path, tmp_path)
    ranges = jobs_seen[0]["parts"]["encoder"]["tensor_ranges"]
    quantiser = activation_quantisers(model)["g_a.2"]
    scale, zero_point = (float(v) for v in quantiser.calculate_qparams())
    expected = [(quantiser.quant_min - zero_point) * scale, (quantiser.quant_max - zero_point) * scale]
    assert np.allclose(ranges["/g_a/g_a.2/Conv_output_0"][:2], expected, rtol=1e-6)
    ptq = study.w8a8_tensor_ranges(study.calibrate(prep.graphs, padded(small_images(4)), tmp_path / "ptq"), "mse")
    assert not np.allclose(ptq["encoder"]["/g_a/g_a.2/Conv_output_0"][:2], expected, rtol=1e-3)
    for part in ("encoder", "decoder"):
        entry = prep.qat_ranges[part]
        assert entry["qat_scales"] >= 15 and entry["qat_scales"] + len(entry["ptq_ranges"]) == len(ptq[part])
    assert "/g_a/g_a.1/eca/ReduceMean_output_0" in prep.qat_ranges["encoder"]["ptq_ranges"]
    assert "/g_s/g_s.1/Sub_output_0" in prep.qat_ranges["decoder"]["ptq_ranges"]
    assert "QAT scales carried by ONNX name: encoder" in "\n".join(report.form_lines({"form": study.form(prep, rk3588)}))
    assert "not carried" in study.form(prep, u55)["qat_ranges"]


def fake_result(model="npu_convtranspose", target="ethos-u55-256", precision="w8a8", fallbacks=()):
    point = {"psnr": 30.0, "ms_ssim": 0.95, "bpp": 0.5}
    part = {"ops_npu": 10 - len(fallbacks), "ops_total": 10, "fallbacks": list(fallbacks),
            "estimates": {"latency_ms": 12.5}, "input_shape": [1, 3, 512, 768]}
    return {"model": model, "target": target, "precision": precision,
            "toolchain": {"name": "ethos-u-vela", "version": "5.2.0"},
            "parts": {"encoder": part, "decoder": dict(part)},
            "roundtrip": {"target": point, "fp32": point, "project_int8": {**point, "source": "onnx_int8_w8a8"},
                          "symbols": {"integer": True, "min": -5, "max": 7, "outside_int8": 0}, "eval_images": 2}}


def test_summary_rows_merge_and_table():
    earlier = [report.summary_row(fake_result()), report.summary_row(fake_result(target="ethos-u85-256"))]
    fallback = {"op": "TRANSPOSE_CONV", "name": "up", "reason": "Unsupported IFM/OFM shapes"}
    new = [report.summary_row(fake_result(fallbacks=[fallback])), report.summary_row(fake_result(precision="a16w8"))]
    rows = report.merged_rows(earlier, new)
    assert [(r["target"], r["precision"]) for r in rows] == [("ethos-u55-256", "w8a8"), ("ethos-u85-256", "w8a8"),
                                                            ("ethos-u55-256", "a16w8")]
    assert rows[0]["encoder_npu"] == [9, 10] and "Unsupported IFM/OFM shapes" in rows[0]["fallbacks"][0]
    table = report.summary_markdown(rows)
    assert "| npu_convtranspose | ethos-u55-256 | w8a8 | 9/10 | 9/10 | 1x encoder: TRANSPOSE_CONV, 1x decoder: " \
           "TRANSPOSE_CONV |" in table
    assert "12.5/12.5" in table and "30.00 dB / 0.9500 / 0.5000" in table
    refused = report.refused_row("gdn_convtranspose", "ethos-u55-256", "a16w8", "Quantization to 16x8-bit not yet "
                                 "supported for op: 'SQRT'", {"upsample": "convtranspose"})
    table = report.summary_markdown(report.merged_rows(rows, [refused]))
    assert "| gdn_convtranspose | ethos-u55-256 | a16w8 | - | - | refused: Quantization to 16x8-bit not yet " \
           "supported for op: 'SQRT' | -/- | - | - | - |" in table



def test_a_compile_only_rknn_report_has_its_text_estimates():
    """RK3588's estimates carry a text entry (where they come from) and a compile-only run no round trip: both reach
    report.md and the summary as text (the first RK3588 run through scripts.npu_targets stopped on '.4g' of it)."""
    result = fake_result(target="rk3588")
    result["toolchain"] = {"name": "rknn-toolkit2", "version": "2.5.0"}
    for part in result["parts"].values():
        part["estimates"] = {"cycles_total": 123456, "source": "rknn-toolkit2 build log"}
    result["roundtrip"] = None
    text = report.target_markdown(result)
    assert "cycles_total 1.235e+05" in text and "source: rknn-toolkit2 build log" in text
    assert "Compiled only" in text
    assert "| npu_convtranspose | rk3588 | w8a8 | 10/10 | 10/10 |" in report.summary_markdown(
        [report.summary_row(result)])

def curve_rows(curve, target, scale_target, scale_int8, upsample="convtranspose"):
    """Four rate points whose target / project INT8 codecs spend ``scale`` x the FP32 bits for the same PSNR."""
    rows = []
    for k, (bpp, psnr) in enumerate([(0.15, 24.0), (0.25, 25.0), (0.40, 26.0), (0.65, 26.8)], 1):
        fp32 = {"psnr": psnr, "ms_ssim": 1 - 10 ** (-psnr / 20), "bpp": bpp}
        result = fake_result(model=f"{curve}-r{k}_{upsample}", target=target)
        result["roundtrip"].update(fp32=fp32, target={**fp32, "bpp": bpp * scale_target},
                                   project_int8={**fp32, "bpp": bpp * scale_int8, "source": "onnx_int8_w8a8"})
        result.update(curve=curve, rate_point=k, upsample=upsample)
        rows.append(report.summary_row(result))
    return rows


def test_curve_bd_rates_against_fp32_and_the_first_curve():
    rows = (curve_rows("gdn", "ethos-u55-256", 1.10, 1.05) + curve_rows("npu", "ethos-u55-256", 1.02, 1.04)
            + curve_rows("npu", "rk3588", 1.03, 1.04))
    deltas = {(d["curve"], d["target"]): d for d in report.curve_deltas(rows[::-1])}  # order of rows is not order of points
    gdn, npu = deltas[("gdn", "ethos-u55-256")], deltas[("npu", "ethos-u55-256")]
    # the same PSNR at scale x the bits is a BD-rate of (scale - 1) on both quality axes
    assert gdn["vs_fp32"]["target_point"]["psnr"]["bd_rate"] == pytest.approx(10.0, abs=1e-6)
    assert gdn["vs_fp32"]["project_int8"]["ms_ssim_db"]["bd_rate"] == pytest.approx(5.0, abs=1e-6)
    assert gdn["within_project"] is False and npu["within_project"] is True
    # on the U55, the first curve seen (rows reversed: npu) anchors; gdn spends 1.10/1.02 of its bits
    assert npu["vs_anchor"]["anchor"] == "npu_convtranspose"
    assert gdn["vs_anchor"]["psnr"]["bd_rate"] == pytest.approx((1.10 / 1.02 - 1) * 100, abs=1e-6)
    assert deltas[("npu", "rk3588")]["vs_anchor"]["psnr"]["bd_rate"] == pytest.approx(0.0, abs=1e-9)
    table = report.curves_markdown(report.curve_deltas(rows))
    assert "| gdn | convtranspose | ethos-u55-256 | w8a8 | 4 | +10.00 % / +10.00 % | +5.00 % / +5.00 % | no | " \
           "(anchor) |" in table
    short = report.curve_deltas(curve_rows("npu", "rk3588", 1.0, 1.0)[:3])
    assert short[0]["within_project"] is None and "needs at least 4 points" in report.curves_markdown(short)


def test_a_fallback_is_refused_in_one_line_naming_the_operator_and_reason():
    fallback = {"op": "TRANSPOSE_CONV", "name": "up", "reason": "Unsupported IFM/OFM shapes"}
    with pytest.raises(npu_targets.UserError, match="TRANSPOSE_CONV 'up': Unsupported IFM/OFM shapes"):
        npu_targets.refuse_fallbacks(fake_result(fallbacks=[fallback]))
    npu_targets.refuse_fallbacks(fake_result())


@pytest.fixture(scope="module")
def refusal_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("npu_refusals")
    arch = make_arch(quality=1, replace="npu")
    model = build_model(arch)
    model.update(force=True)
    save_checkpoint({"state_dict": model.state_dict(), "arch": arch}, root / "npu.pt")
    hyper = make_arch(base_model="bmshj2018-hyperprior", quality=1, replace="relu")
    save_checkpoint({"state_dict": build_model(hyper).state_dict(), "arch": hyper}, root / "hyper.pt")
    (root / "junk.pt").write_bytes(b"\x00" * 64)
    photos = root / "photos"
    photos.mkdir()
    for index, image in enumerate(small_images(5)):
        from PIL import Image
        Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(photos / f"{index}.png")
    few = root / "few"
    few.mkdir()
    (few / "0.png").write_bytes((photos / "0.png").read_bytes())
    (few / "broken.jpg").write_bytes(b"not a jpeg")
    return root


NPU_REFUSALS = {
    "unknown target": (["--targets", "ethos-u99"], "unknown target 'ethos-u99'"),
    "too few calibration photos": (["--calib_dir", "{root}/few"], "at least 4 readable photos"),
    "missing calibration folder": (["--calib_dir", "{root}/nowhere"], "does not exist"),
    "checkpoint of the wrong kind": (["--ckpt", "{root}/hyper.pt"], "factorized-prior"),
    "not a checkpoint": (["--ckpt", "{root}/junk.pt"], "not a readable PyTorch checkpoint"),
    "input size not a multiple of 64": (["--input_size", "100x64"], "multiples of 64"),
    "curve without checkpoints": (["--curve", "npu="], "expected NAME=CKPT"),
    "curve of a hyperprior": (["--curve", "npu={root}/npu.pt,{root}/hyper.pt"], "factorized-prior"),
}


@pytest.mark.parametrize("case", sorted(NPU_REFUSALS))
def test_npu_targets_refusals_are_one_line(case, refusal_files, tmp_path, capsys):
    flags, needle = NPU_REFUSALS[case]
    argv = {"--ckpt": str(refusal_files / "npu.pt"), "--calib_dir": str(refusal_files / "photos"),
            "--eval_dir": str(refusal_files / "photos"), "--targets": "ethos-u55-256", "--precision": "w8a8",
            "--out": str(tmp_path / "out"), "--input_size": "64x64"}
    argv.update({flag: value.format(root=refusal_files) for flag, value in zip(flags[::2], flags[1::2])})
    err = one_line_error(npu_targets.main, [item for pair in argv.items() for item in pair], capsys)
    assert needle in err, err
    assert not (tmp_path / "out" / "npu_convtranspose").exists()


def test_missing_toolchain_names_the_install_command(tmp_path):
    (tmp_path / "targets" / "ethosu").mkdir(parents=True)
    (tmp_path / "targets" / "ethosu" / "requirements.txt").write_text("ethos-u-vela==5.2.0\n")
    with pytest.raises(toolchains.UserError, match=r"run `\./run\.sh npu-setup ethosu`"):
        toolchains.toolchain_python("ethosu", tmp_path)
    # a venv built from other requirements is not taken for this one
    (tmp_path / ".venv-ethosu").mkdir()
    (tmp_path / ".venv-ethosu" / toolchains.STAMP).write_text("0" * 64 + "\n")
    assert not toolchains.installed("ethosu", tmp_path)
    stamp = toolchains.requirements_digest("ethosu", tmp_path)
    (tmp_path / ".venv-ethosu" / toolchains.STAMP).write_text(stamp + "\n")
    assert toolchains.toolchain_python("ethosu", tmp_path) == tmp_path / ".venv-ethosu" / "bin" / "python"
    # a --no-deps file is part of what the venv was built from
    (tmp_path / "targets" / "ethosu" / "requirements-nodeps.txt").write_text("some-toolkit==1.0\n")
    assert not toolchains.installed("ethosu", tmp_path)


def test_failed_install_is_one_line_naming_the_command(tmp_path):
    (tmp_path / "targets" / "ethosu").mkdir(parents=True)
    (tmp_path / "targets" / "ethosu" / "requirements.txt").write_text("ethos-u-vela==5.2.0\n")
    with pytest.raises(toolchains.UserError, match=r"`false -m venv .*\.venv-ethosu` exited 1"):
        toolchains.create_venv("ethosu", tmp_path, python="/bin/false")
    assert not toolchains.installed("ethosu", tmp_path)


def test_setup_of_an_unknown_toolchain_is_one_line(capsys):
    assert "no toolchain 'tpu'" in one_line_error(npu_setup.main, ["tpu"], capsys)


@pytest.mark.own_process  # codec_files writes a bundle, whose verification runs OpenVINO (see run.sh)
def test_a_bundle_stands_for_the_checkpoint_it_was_written_from(codec_files, tmp_path, capsys):
    import json
    import shutil

    from tests.conftest import tiny_checkpoint

    assert npu_targets.bundle_source(str(codec_files["bundle"])) == (str(codec_files["ckpt"]), "convtranspose")
    bundle = shutil.copytree(codec_files["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    argv = ["--bundle", str(bundle), "--calib_dir", str(tmp_path), "--out", str(tmp_path / "out")]
    for source, needle in ((tiny_checkpoint(tmp_path / "other.pt", seed=1), "no longer holds the entropy tables"),
                           (tmp_path / "gone.pt", "which is not there")):
        (bundle / "manifest.json").write_text(json.dumps({**manifest, "source": str(source)}))
        assert needle in one_line_error(npu_targets.main, argv, capsys)
    assert not (tmp_path / "out").exists()
