"""PTQ INT8 (src.quant.ptq): the symbol interface, the precision profiles, the ranges, the integer-only audit."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from src.cli import UserError
from src.images import image_tensor, load_rgb
from src.model_factory import build_model, make_arch
from src.npu_blocks import ECAGate, GDNishLiteDec, GDNishLiteEnc
from src.quant.ptq import (calibrate, clipped_biases, pad_to, plan, quantise, quantise_half, quantise_pair, run,
                           session, symbol_bits)
from src.quant.ranges import HISTOGRAM_BINS, TensorHistogram, choose_range, quantisation_error
from src.quant.scheme import PROFILES
from src.quant.symbols import DECODER_INPUT, ENCODER_OUTPUT, gates_as_clips, symbol_graphs
from src.sample_photos import COLOR_PHOTOS, skimage_photos

SIDE = 128


def spread_model(replace: str = "npu") -> torch.nn.Module:
    """An untrained model whose latent spans many symbols (g_a's last conv scaled) and whose gates are not 1."""
    torch.manual_seed(0)
    model = build_model(make_arch(quality=1, replace=replace, replace_parts="all" if replace != "none" else "none"))
    with torch.no_grad():
        model.g_a[-1].weight.mul_(60.0)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d):  # the ECA gates
                module.weight.normal_(0, 0.5)
                module.bias.normal_(0, 0.5)
            if isinstance(module, GDNishLiteDec):
                module.scale.weight.normal_(0, 0.5)
        # medians away from 0 (an untrained prior's are all 0), so that the symbol interface's "- median" is seen
        model.entropy_bottleneck.quantiles.add_(torch.randn(model.entropy_bottleneck.quantiles.shape[0], 1, 1) * 2)
    model.eval().update(force=True)
    return model


def photos(count: int):
    """Whole-image inputs: real photos, cut to SIDE x SIDE and padded as the codec pads."""
    return [pad_to(image_tensor(load_rgb(p)).numpy()[..., :SIDE, :SIDE], 64)
            for p in skimage_photos(COLOR_PHOTOS)[:count]]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model = spread_model()
    folder = tmp_path_factory.mktemp("int8")
    images = photos(4)
    fp32 = symbol_graphs(model, torch.from_numpy(images[0]), folder)
    calib = calibrate(fp32, images[:3], folder)
    pairs = {profile: quantise_pair(calib, profile, "mse", folder / profile) for profile in PROFILES}
    return model, fp32, calib, pairs, images[3]


def test_gates_as_clips_computes_the_same_function():
    model = spread_model()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for transform, inp in ((model.g_a, x), (model.g_s, torch.randn(1, 192, 4, 4) * 3)):
            rewritten = gates_as_clips(transform)
            assert not any(isinstance(m, (ECAGate, torch.nn.Hardsigmoid)) for m in rewritten.modules())
            torch.testing.assert_close(rewritten(inp), transform(inp), atol=1e-4, rtol=1e-4)


def test_fp32_symbol_graphs_are_the_codec(calibrated):
    """Encoder graph = CompressAI's symbols round(y - median); decoder graph on them = g_s(y_hat)."""
    model, fp32, _, _, held_out = calibrated
    x = torch.from_numpy(held_out)
    eb = model.entropy_bottleneck
    with torch.no_grad():
        expected = eb.quantize(model.g_a(x), "symbols", eb._get_medians()).float()
        x_hat = model.g_s(eb.dequantize(expected.int(), eb._get_medians()))
    got = run(session(fp32["encoder"]), held_out)
    assert eb._get_medians().abs().max() > 1, "the medians are not all 0"
    assert len(np.unique(got)) > 5, "the test latent spans several symbols"
    assert (got == expected.numpy()).mean() > 0.999  # only .5 ties may round the other way
    decoded = run(session(fp32["decoder"]), expected.numpy())
    assert np.abs(decoded - x_hat.numpy()).max() < 1e-3


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_int8_encoder_outputs_the_codecs_symbols(calibrated, profile):
    """Integers, and the FP32 codec's symbols on most positions (INT8 noise moves only values near a .5)."""
    _, fp32, _, pairs, held_out = calibrated
    expected = run(session(fp32["encoder"]), held_out)
    got = run(session(pairs[profile].encoder), held_out)
    assert np.array_equal(got, np.round(got)), "the INT8 encoder's output is the symbols themselves"
    # This untrained latent is noisy (its last conv scaled 60x); measured here: 96 % (w8a8), 99 % (a16w8).
    assert (got == expected).mean() > {"w8a8": 0.9, "a16w8": 0.97}[profile]
    assert np.abs(got - expected).max() <= 2


def test_int8_decoder_given_symbols_matches_fp32(calibrated):
    """Stated error: mean |INT8 - FP32| under 2/255 (w8a8) and a16w8 at least 2x closer than w8a8."""
    _, fp32, _, pairs, held_out = calibrated
    symbols = run(session(fp32["encoder"]), held_out)
    reference = run(session(fp32["decoder"]), symbols).clip(0, 1)
    error = {p: np.abs(run(session(pair.decoder), symbols).clip(0, 1) - reference).mean()
             for p, pair in pairs.items()}
    assert 0 < error["w8a8"] < 2 / 255
    assert error["a16w8"] < error["w8a8"] / 2


def quant_params(path: Path):
    """tensor -> (quant type, scale) of each QuantizeLinear in a graph (onnxruntime names the scale TENSOR_scale)."""
    graph = onnx.load(str(path)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {n.input[1].removesuffix("_scale"): (consts[n.input[2]].dtype if len(n.input) > 2 else np.uint8,
                         float(np.asarray(consts[n.input[1]]).reshape(-1)[0]))
            for n in graph.node if n.op_type == "QuantizeLinear" and n.input[1] in consts}


def test_profiles_put_16_bits_on_the_main_path_and_symbols_at_scale_1(calibrated):
    _, _, _, pairs, _ = calibrated
    w8, a16 = pairs["w8a8"], pairs["a16w8"]
    assert w8.sixteen_bit == {"encoder": [], "decoder": []}
    # main path: g_a's 3 strided convs and 3 block sums (the 4th conv is the symbols); g_s: 4 + 3, and y_hat
    assert (len(a16.sixteen_bit["encoder"]), len(a16.sixteen_bit["decoder"])) == (6, 8)
    for pair in (w8, a16):
        enc, dec = quant_params(pair.encoder), quant_params(pair.decoder)
        assert enc[ENCODER_OUTPUT] == (np.int8, 1.0) and dec[DECODER_INPUT] == (np.int8, 1.0)
        for half, params in (("encoder", enc), ("decoder", dec)):
            sixteen = {t for t, (dtype, _) in params.items() if dtype == np.uint16}
            assert sixteen == set(pair.sixteen_bit[half])
        assert pair.float_islands == {"encoder": [], "decoder": []}, "every compute op sits between DQ and Q"


def trained_like_gates(tmp_path):
    """Calibration of a model whose ECA gates are as training leaves them: conv weights ~1e-3, gain ~1, so the
    folded bias (~1) needs a fine int32 scale when the pool is at 16 bits."""
    model = spread_model()
    with torch.no_grad():
        for module in model.g_a.modules():
            if isinstance(module, GDNishLiteEnc):
                module.project.weight.normal_(0, 0.02)
            if isinstance(module, torch.nn.Conv1d):
                module.weight.normal_(0, 1e-3)
                module.bias.zero_()
    images = photos(2)
    fp32 = symbol_graphs(model, torch.from_numpy(images[0]), tmp_path)
    calib = calibrate(fp32, images, tmp_path)
    pools = [t for t in calib.encoder if t.endswith("pool/GlobalAveragePool_output_0")]
    return calib, pools


def test_a_pool_at_16_bits_takes_its_reshape_along_and_no_bias_is_clipped(tmp_path):
    calib, pools = trained_like_gates(tmp_path)
    out = tmp_path / "trial.onnx"
    qplan = quantise_half(calib, "encoder", "w8a8", "mse", out, extra_sixteen_bit=pools)
    reshapes = set(qplan.sixteen_bit) - set(pools)
    assert len(reshapes) == len(pools) and all("Reshape" in r for r in reshapes)
    assert clipped_biases(out) == []
    fp32_symbols = run(session(calib.sources["encoder"]), calib.images[1])
    int8_symbols = run(session(out), calib.images[1])
    assert np.mean(np.abs(np.round(fp32_symbols) - int8_symbols) <= 1) > 0.99


def test_a_plan_that_splits_a_pool_from_its_reshape_is_refused(tmp_path):
    """Without the Reshape, onnxruntime clips the gate's int32 bias (the gate fell from ~1 to ~0.04): refused."""
    calib, pools = trained_like_gates(tmp_path)
    qplan = plan(calib.encoder, pools, ENCODER_OUTPUT, 8, "mse")
    with pytest.raises(UserError, match="clipped the int32 bias"):
        quantise(calib.sources["encoder"], tmp_path / "split.onnx", qplan, calib.images[0])


def test_symbols_outside_int8_get_a_16_bit_interface():
    assert symbol_bits([np.array([-128.0, 127.0])]) == (8, 0)
    assert symbol_bits([np.array([-129.0, 3.0, 200.0])]) == (16, 2)


def test_float_islands_are_found_in_a_gdn_graph(tmp_path):
    """GDN's Div/Sqrt are not quantised by onnxruntime: the audit names them."""
    model = spread_model("none")
    images = photos(2)
    fp32 = symbol_graphs(model, torch.from_numpy(images[0]), tmp_path)
    pair = quantise_pair(calibrate(fp32, images, tmp_path), "w8a8", "minmax", tmp_path / "q")
    ops = " ".join(pair.float_islands["encoder"])
    assert "Div" in ops or "Sqrt" in ops or "Pow" in ops


def histogram(values: np.ndarray) -> TensorHistogram:
    counts = np.histogram(values, HISTOGRAM_BINS, range=(values.min(), values.max()))[0]
    return TensorHistogram(float(values.min()), float(values.max()), counts)


def simulated_error(values, low, high, bits):
    step = (high - low) / (2 ** bits - 1)
    q = np.clip(np.round((values - low) / step), 0, 2 ** bits - 1) * step + low
    return float(np.mean((values - q) ** 2))


def test_quantisation_error_model_matches_simulation_and_mse_beats_minmax():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(1_000_000), [40.0, -35.0]])  # two outlier pixels in a million
    hist = histogram(values)
    for low, high in ((values.min(), values.max()), (-3.0, 3.0), (-1.0, 2.0)):
        modelled = quantisation_error(hist, [low], [high], 8)[0]
        assert modelled == pytest.approx(simulated_error(values, low, high, 8), rel=0.02)
    mse, minmax = choose_range(hist, 8, "mse"), choose_range(hist, 8, "minmax")
    assert minmax == (values.min(), values.max())
    assert mse[1] - mse[0] < 0.5 * (minmax[1] - minmax[0]), "two outliers do not set the 8-bit range"
    assert simulated_error(values, *mse, 8) < 0.5 * simulated_error(values, *minmax, 8)
    wide = choose_range(hist, 16, "mse")
    assert wide[1] - wide[0] > mse[1] - mse[0], "16 bits afford a wider range"


def test_export_onnx_int8_reports_the_profile(tmp_path, prepared64):
    from scripts import export_onnx
    from src.checkpoint import save_checkpoint

    model = spread_model()
    ckpt = save_checkpoint({"state_dict": model.state_dict(), "arch": make_arch(quality=1, replace="npu",
                                                                                replace_parts="all")},
                           tmp_path / "npu.pt") or tmp_path / "npu.pt"
    image = str(sorted((prepared64 / "val").iterdir())[0])
    report = export_onnx.main(["--ckpt", str(ckpt), "--part", "decoder", "--out", str(tmp_path / "dec.onnx"),
                               "--input_size", "64", "--image", image, "--int8", str(prepared64 / "train"),
                               "--calib_count", "6", "--precision", "a16w8", "--calib_method", "mse"])["int8"]
    assert report["interface"] == "symbols" and report["profile"] == "a16w8" and report["range_method"] == "mse"
    assert len(report["sixteen_bit"]["decoder"]) == 8 and report["float_islands"] == []
    assert report["symbol_bits"] == 8 and 0 <= report["symbols_differ"] < 0.05
    decoder = session(Path(report["int8_path"]))
    assert decoder.get_inputs()[0].name == "symbols", "the kept INT8 decoder takes the symbols"
