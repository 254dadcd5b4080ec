"""QAT as a phase after float training: placement = the exported INT8 graph, PTQ's calibration, phases, resume."""


import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import train_finetune_npu
from scripts import export_onnx
from src import eval as recipe_eval
from src.checkpoint import read_checkpoint, state_and_arch
from src.checkpoint_format import absolute_step_scales_to_4
from src.cli import UserError
from src.model_factory import build_model, load_weights, make_arch, model_from_base_weights, model_from_checkpoint
from src.quant.fake_quant import LearnedFakeQuantize, activation_quantisers, float_twin, placement, qat_sites, qat_state
from src.quant.ptq import run, session
from src.quant.qat import calibrate, calibration_images, export_pair, graph_qparams
from src.quant.scheme import LOG_SCALE_GAIN, qat_scheme
from src.quant.symbols import latent_medians
from tests.conftest import assert_same_weights, common_args, final_state, photo_paths, qat_flags

# onnxruntime computes in integers and requantises after every op, the fake-quant model in float: its output
# may differ by a few 8-bit quantisation steps of the output where a requantisation lands on the other side of a
# rounding boundary; on average far less than one.
MAX_STEPS, MEAN_STEPS = 4.0, 0.5


def float_arch():
    return make_arch(quality=1, replace="npu", replace_parts="all")


def float_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(float_arch())
    with torch.no_grad():  # leave the identity init (zero branches): every site then carries real values
        for p in model.g_a.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for p in model.g_s.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def qat_model(precision="w8a8", scales="frozen", seed=0, **ablation):
    model = float_model(seed)
    return model_from_base_weights(make_arch(**dict(float_arch(), qat=qat_scheme(precision, scales, **ablation))),
                                   model.state_dict(), float_arch(), "float")


@pytest.fixture(scope="module")
def photos():
    """Three small whole photos (padded to 64), as QAT and PTQ calibrate."""
    arrays = calibration_images(photo_paths()[:3])
    return [a[..., :128, :128] for a in arrays]


@pytest.fixture(scope="module")
def calibrated(photos, tmp_path_factory):
    """``calibrated(precision, scales, **ablation)``: (a QAT model calibrated on ``photos``, calibrate's report).

    Each scheme is calibrated (exported and run through onnxruntime's calibration) once per module; every test
    gets its own deep copy to train, update or export.
    """
    done = {}

    def calibrated_model(precision="w8a8", scales="frozen", **ablation):
        key = (precision, scales, tuple(sorted(ablation.items())))
        if key not in done:
            model = qat_model(precision, scales, **ablation)
            done[key] = model, calibrate(model, photos, "mse", tmp_path_factory.mktemp("calib"))
        model, info = done[key]
        return copy.deepcopy(model), info

    return calibrated_model


def test_sites_are_the_fused_graph_tensors_of_the_npu_blocks():
    names = [s.name for s in qat_sites(build_model(float_arch()))]
    assert "g_a.1.act1" in names and "g_a.1.expand" not in names, "Conv + ReLU6 is one quantised tensor"
    assert "g_a.1.dw" not in names and "g_s.1.dw" in names, "a conv without activation is quantised itself"
    assert {"g_a.1.eca.gate", "g_a.1.eca.gated", "g_a.1.summed", "g_s.1.gain_out", "g_s.1.gained"} <= set(names)
    assert "g_a.6" not in names, "g_a's output quantiser is the codec's rounding (scale 1), not a fake-quant"
    assert names[0] == "g_a:in" and "g_s:in" in names and names[-1] == "g_s.6"


def test_uncalibrated_qat_computes_the_float_model():
    model, reference = qat_model().eval(), float_model().eval()
    assert qat_state(model) == "uncalibrated"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["x_hat"], reference(x)["x_hat"])


@pytest.mark.parametrize("precision", ["w8a8", "a16w8"])
def test_placement_and_outputs_equal_the_exported_int8_graph(precision, calibrated, photos, tmp_path):
    model, info = calibrated(precision)  # calibrate raises if a site and a graph tensor differ
    assert qat_state(model) == "training with frozen scales" and info["sites"] == len(activation_quantisers(model))
    assert info["sixteen_bit"] == (0 if precision == "w8a8" else 14)
    pair = export_pair(model, photos, tmp_path / "export")
    for half, prepared in (("encoder", "encoder_centred"), ("decoder", "decoder")):
        graph = graph_qparams(model, getattr(pair, half), tmp_path / "export" / f"{prepared}.prepared.onnx")
        ours = {k: v for k, v in activation_quantisers(model).items() if k in graph}
        assert ours, half
        for site, (scale, zero_point, bits) in graph.items():
            fq = ours[site]
            assert scale == pytest.approx(float(fq.scale), rel=1e-6) and zero_point == int(fq.zero_point), site
            assert 2 ** bits - 1 == fq.quant_max, site
    assert placement(model, {**graph_qparams(model, pair.encoder, tmp_path / "export/encoder_centred.prepared.onnx"),
                             **graph_qparams(model, pair.decoder, tmp_path / "export/decoder.prepared.onnx")}) == \
        {"only_in_model": [], "only_in_graph": []}
    # The same rounding: the INT8 graphs' outputs against the fake-quant model's.
    image = photos[0]
    medians = latent_medians(model).reshape(1, -1, 1, 1)
    with torch.no_grad():
        symbols_fq = torch.round(model.g_a(torch.from_numpy(image)) - medians).numpy()
    symbols = run(session(pair.encoder), image)
    assert np.mean(symbols != symbols_fq) < 0.02
    with torch.no_grad():
        x_hat_fq = model.g_s(torch.from_numpy(symbols) + medians).numpy()
    x_hat = run(session(pair.decoder), symbols)
    # In steps of x_hat's range on 8 bits: the flips that differ happen in 8-bit tensors (a16w8's x_hat is 16-bit).
    out = activation_quantisers(model)["g_s.6"]
    step = float(out.scale) * out.quant_max / 255
    off = np.abs(x_hat - x_hat_fq) / step
    assert off.max() <= MAX_STEPS and off.mean() <= MEAN_STEPS, (off.max(), off.mean())


def test_weights_are_rounded_as_onnxruntime_rounds_them(calibrated, photos, tmp_path):
    model, _ = calibrated()
    graph = onnx.load(str(export_pair(model, photos, tmp_path / "export").decoder)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    checked = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith(".weight_quantized"):
            continue
        module_name = node.input[0][: -len(".weight_quantized")]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) or module_name.endswith(".scale"):
            continue  # the folded gate's conv is a scaled copy
        q, scale = consts[node.input[0]].astype(np.float64), consts[node.input[1]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        step = scale.reshape(shape).astype(np.float64)
        ours = module.weight.detach().numpy() / step  # the parametrised (fake-quant) weight, in steps
        raw = module.parametrizations.weight.original.detach().numpy() / step
        off = np.abs(q - ours)
        assert off.max() < 1 + 1e-3, module_name
        # A value may land on the other integer only at a tie (x.5): w / scale is computed in another order.
        ties = np.abs(np.abs(raw[off > 0.5]) % 1 - 0.5)
        assert np.all(ties < 1e-3) and (off > 0.5).mean() < 1e-3, (module_name, ties.max(initial=0))
        checked += 1
    assert checked >= 7, "every g_s conv and ConvTranspose"


def test_learned_scales_take_the_same_relative_step_whatever_their_size(calibrated):
    """Adam steps a parameter by about the lr: in log space that is one fraction of every scale. Learnt as
    themselves, the scales of 1e-4 to 1e-3 moved by -91 % to +426 % in 320 steps, those near 2e-2 by -10 % to +7 %."""
    model, _ = calibrated(scales="learned")
    quantisers = {n: q for n, q in activation_quantisers(model).items() if isinstance(q, LearnedFakeQuantize)}
    before = {n: float(q.scale) for n, q in quantisers.items()}
    assert max(before.values()) / min(before.values()) > 10, "the sites' scales differ in size"
    lr = 1e-4
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()(torch.rand(2, 3, 64, 64))["x_hat"].mean().backward()
    optimizer.step()
    moved = {n: abs(np.log(float(q.scale) / before[n])) for n, q in quantisers.items()
             if q.log_scale.grad.abs() > 1e-6}
    assert len(moved) > len(quantisers) // 2
    for name, step in moved.items():  # Adam's first step: lr * grad / (|grad| + eps), lr * sign(grad) but for eps
        assert step == pytest.approx(LOG_SCALE_GAIN * lr, rel=0.02), name


def absolute_step_state(state):
    """``state`` as the earlier scheme (torch.ao's _LearnableFakeQuantize) wrote it: the scale itself, and every
    other key that class had, as in a real checkpoint."""
    old = {}
    for key, value in state.items():
        if key.endswith(".log_scale"):
            prefix = key[: -len("log_scale")]
            old[prefix + "scale"] = torch.exp(LOG_SCALE_GAIN * value)
            for extra in ("static_enabled", "learning_enabled"):
                old[prefix + extra] = torch.tensor([0], dtype=torch.uint8)
            old[prefix + "eps"] = torch.tensor([1.1920928955078125e-07])
            for extra in ("eps", "min_val", "max_val"):
                old[prefix + "activation_post_process." + extra] = torch.tensor(0.0)
        else:
            old[key] = value
    return old


def test_the_absolute_step_upgrade_keeps_every_calibrated_scale(calibrated):
    """Format 3 -> 4 (src.checkpoint_format) on a calibrated model, its scales of every size: each comes back as it
    was; the run is marked not resumable, but a frozen-scale one is (its scales were buffers then as now)."""
    model, _ = calibrated(scales="learned")
    earlier = {k: v for k, v in qat_scheme(scales="learned").items() if k != "learned_scales"}
    payload = {"state_dict": absolute_step_state(model.state_dict()), "arch": dict(float_arch(), qat=earlier),
               "optimizer": {}, "args": {}}
    payload = absolute_step_scales_to_4(payload, "a checkpoint of the earlier scheme")
    assert payload["arch"]["qat"] == qat_scheme(scales="learned") and payload["not_resumable"]
    fresh = load_weights(qat_model(scales="learned"), payload["state_dict"], "a checkpoint of the earlier scheme")
    for name, fq in activation_quantisers(fresh).items():
        assert float(fq.scale) == pytest.approx(float(activation_quantisers(model)[name].scale), rel=1e-5), name
    frozen = qat_model(scales="frozen")
    payload = {"state_dict": frozen.state_dict(), "arch": dict(float_arch(), qat=dict(earlier, scales="frozen")),
               "optimizer": {}, "args": {}}
    assert "not_resumable" not in absolute_step_scales_to_4(payload, "frozen"), "its resume is exact"


def test_learned_scales_get_gradients_and_frozen_ones_are_buffers(calibrated):
    (learned, _), (frozen, _) = calibrated(scales="learned"), calibrated(scales="frozen")
    fq = activation_quantisers(learned)["g_s.1.act"]
    assert isinstance(fq, LearnedFakeQuantize) and qat_state(learned) == "training with learned scales"
    learned.train()(torch.rand(2, 3, 64, 64))["x_hat"].mean().backward()
    assert fq.log_scale.grad is not None and float(fq.log_scale.grad.abs()) > 0
    assert not any(n.endswith((".log_scale", ".zero_point")) for n, _ in frozen.named_parameters())
    a16 = qat_model("a16w8", "learned")
    assert not isinstance(activation_quantisers(a16)["g_s.0"], LearnedFakeQuantize), "16-bit scales stay frozen"


def test_ablations_round_where_the_graph_does_not(photos, tmp_path):
    model = qat_model(placement="double", interface="latent")
    calibrate(model, photos, "mse", tmp_path / "calib")  # the graph's own sites still match it exactly
    quantisers = activation_quantisers(model)
    extra = sorted(n for n, fq in quantisers.items() if not fq.in_graph)
    assert extra == sorted(["g_a.6"] + [f"g_a.{i}.{c}" for i in (1, 3, 5) for c in ("dw", "expand")]
                           + [f"g_s.{i}.mix" for i in (1, 3, 5)])
    y_fq = quantisers["g_a.6"]
    with torch.no_grad():
        y = model.g_a(torch.from_numpy(photos[0]))
    q = y / y_fq.scale + y_fq.zero_point
    assert torch.allclose(q, q.round(), atol=1e-3), "the old latent interface: y on an 8-bit grid"
    pair = export_pair(model, photos, tmp_path / "export")  # exported as the graph is: the extras are not in it
    assert placement(model, graph_qparams(model, pair.encoder, tmp_path / "export/encoder_centred.prepared.onnx")
                     )["only_in_graph"] == []


def test_qat_state_dict_rebuilds_the_same_model(calibrated):
    model, _ = calibrated(scales="learned")
    model.update(force=True)
    arch = make_arch(**dict(float_arch(), qat=qat_scheme("w8a8", "learned")))
    rebuilt, _ = model_from_checkpoint(model.state_dict(), arch, "mem")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["x_hat"], rebuilt.eval()(x)["x_hat"])
        assert torch.equal(float_twin(model)(x)["x_hat"], float_model()(x)["x_hat"]), "the twin is the float model"
    assert qat_state(model) == "training with learned scales", "the twin leaves the QAT model as it was"
    with pytest.raises(UserError, match="QAT checkpoint"):
        model_from_base_weights(float_arch(), model.state_dict(), arch, "qat.pt")
    with pytest.raises(ValueError, match="qat must be"):
        make_arch(qat={"weights": "int4"})


# ---------------------------------------------------------------- the engine's QAT phase

def test_qat_refuses_to_start_from_anything_but_a_float_checkpoint(prepared64, coco_root, tmp_path, float_run):
    with pytest.raises(UserError, match="phase after float training"):
        train_finetune_npu.main(common_args(prepared64, tmp_path / "a", *qat_flags(coco_root)))
    gdn = make_arch(quality=1, replace="none")
    with pytest.raises(UserError, match="QAT is a phase after float training"):
        model_from_base_weights(make_arch(**dict(float_arch(), qat=True)), build_model(gdn).state_dict(), gdn, "g")
    with pytest.raises(UserError, match="prepared crops are not whole photos"):
        train_finetune_npu.main(common_args(prepared64, tmp_path / "b", "--qat", "true", "--base_checkpoint",
                                            str(float_run)))
    for removed in (["--qat_calib_steps", "2"], ["--qat_freeze_after", "3"]):
        with pytest.raises(SystemExit):
            train_finetune_npu.main(common_args(prepared64, tmp_path / "c", *removed))


def test_qat_phases_in_order_in_the_log_and_the_checkpoint(qat_run):
    ckpt, log = qat_run
    order = [log.index(s) for s in ("QAT: 45 activation", "QAT phase 1/2: calibrating", "QAT phase 2/2: 45",
                                    "now training with learned scales", "training on")]
    assert order == sorted(order), log[:3000]
    payload = read_checkpoint(ckpt)
    state, arch = state_and_arch(payload, ckpt)
    assert arch["qat"] == qat_scheme("w8a8", "learned") and payload["args"]["qat_calib_count"] == 2
    model, _ = model_from_checkpoint(state, arch, str(ckpt))
    assert qat_state(model) == "training with learned scales", "the default"


def test_qat_resume_is_exact(float_run, prepared64, coco_root, tmp_path):
    flags = qat_flags(coco_root, "--qat_scales", "learned", "--base_checkpoint", str(float_run))
    train_finetune_npu.main(common_args(prepared64, tmp_path / "straight", *flags, "--epochs", "2"))
    train_finetune_npu.main(common_args(prepared64, tmp_path / "split", *flags, "--epochs", "1"))
    last = tmp_path / "split" / "ckpt" / "last.pt"
    resume_flags = [f for f in flags if f not in ("--base_checkpoint", str(float_run))]
    train_finetune_npu.main(common_args(prepared64, tmp_path / "split", *resume_flags, "--epochs", "1",
                                        "--resume", str(last), "--extend_epochs", "1"))
    straight = final_state(tmp_path / "straight" / "ckpt" / "last.pt")
    assert any(k.endswith("output_fake_quant.log_scale") for k in straight)
    assert_same_weights(straight, final_state(last))


def test_export_int8_of_a_qat_checkpoint_carries_its_scales(qat_run, prepared64, coco_root, tmp_path):
    ckpt, _ = qat_run
    image = str(sorted((prepared64 / "val").iterdir())[0])
    report = export_onnx.main(["--ckpt", str(ckpt), "--part", "decoder", "--out", str(tmp_path / "dec.onnx"),
                               "--input_size", "64", "--image", image, "--int8", str(coco_root / "val2017"),
                               "--dynamic"])
    int8 = report["int8"]
    assert int8["method"] == "qat" and int8["calib_images"] == 0 and int8["profile"] == "w8a8"
    assert int8["bpp_int8"] > 0 and int8["interface"] == "symbols" and not int8["float_islands"]
    model, _ = model_from_checkpoint(*state_and_arch(read_checkpoint(ckpt), ckpt), "qat")
    graph = onnx.load(int8["int8_path"]).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    y_hat = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "/Add_output_0")
    assert float(consts[y_hat.input[1]]) == pytest.approx(float(activation_quantisers(model)["g_s:in"].scale),
                                                          rel=1e-6)
    # its --bundle is tested in tests/test_codec.py: a bundle loads OpenVINO, which runs in a process of its own


def test_qat_eval_measures_the_fake_quant_codec(qat_run, prepared64):
    ckpt, _ = qat_run
    result = recipe_eval.main(["--coco_dir", str(prepared64), "--checkpoint", str(ckpt)])["results"][0]
    assert result["arch"]["qat"] is not None and result["mean"]["bpp_real"] > 0
