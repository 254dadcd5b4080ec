"""Quantisation-aware training: where fake-quant goes, what it computes, and the checkpoint -> QDQ graph path."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization import FakeQuantize

import train_finetune_npu
from scripts import export_onnx
from src import eval as recipe_eval
from src.checkpoint import read_checkpoint, state_and_arch
from src.cli import UserError
from src.export import NPU_FORBIDDEN_OPS
from src.model_factory import build_model, make_arch, model_from_base_weights, model_from_checkpoint
from src.npu_blocks import QuantPoint
from src.qat import calibrate, float_weights_and_activations, output_step, qat_state, set_qat_mode
from tests.test_eval_export import train


def npu_arch(qat):
    return make_arch(quality=1, replace="npu", replace_parts="all", qat=qat)


def calibrated_qat_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(npu_arch(True))
    batches = [torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8) for _ in range(3)]
    calibrate(model, batches, steps=3, device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False))
    return model.eval()


def on_grid(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> bool:
    """Whether every value is ``(q - zero_point) * scale`` for an integer q in [qmin, qmax]."""
    q = values / scale + zero_point
    return bool(torch.allclose(q, q.round(), atol=1e-3) and q.round().min() >= qmin and q.round().max() <= qmax)


def test_fake_quant_goes_into_g_a_and_g_s_only():
    model = build_model(npu_arch(True))
    convs = [m for part in (model.g_a, model.g_s) for m in part.modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d))]
    assert convs and all(hasattr(m, "parametrizations") for m in convs), "every conv weight is fake-quantised"
    points = [m for m in model.modules() if isinstance(m, QuantPoint)]
    assert len(points) == 3 * 2 + 3 * 3  # encoder: ECA product, residual sum; decoder: gain, product, sum
    assert all(isinstance(m.output_fake_quant, FakeQuantize) for m in points)
    assert isinstance(model.g_a[0].input_fake_quant, FakeQuantize)
    assert not any(isinstance(m, FakeQuantize) for m in model.entropy_bottleneck.modules())
    assert qat_state(model) == "off"


def test_qat_off_computes_exactly_the_float_model():
    torch.manual_seed(0)
    float_model = build_model(npu_arch(None)).eval()
    qat_model = model_from_base_weights(npu_arch(True), float_model.state_dict(), npu_arch(None), "float").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(float_model.g_a(x), qat_model.g_a(x))
        assert torch.equal(float_model(x)["x_hat"], qat_model(x)["x_hat"])


def test_weights_and_activations_land_on_the_int8_grids():
    model = calibrated_qat_model()
    assert qat_state(model) == "training (observing)"
    for module in list(model.g_a.modules()) + list(model.g_s.modules()):
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            fq = module.parametrizations.weight[0]
            axis = 1 if isinstance(module, nn.ConvTranspose2d) else 0
            shape = [1] * module.weight.dim()
            shape[axis] = -1
            assert fq.scale.numel() == module.weight.shape[axis] and torch.all(fq.zero_point == 0)
            assert on_grid(module.weight.detach(), fq.scale.reshape(shape), 0, -128, 127)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        y = model.g_a(x)
    fq = model.g_a[-1].output_fake_quant
    assert output_step(model, "g_a") == pytest.approx(float(fq.scale))
    assert on_grid(y, fq.scale, fq.zero_point, 0, 255), "the latent the encoder hands over is UINT8"
    with torch.no_grad(), float_weights_and_activations(model):
        y_float = model.g_a(x)
    assert not on_grid(y_float, fq.scale, fq.zero_point, 0, 255)
    assert bool(model.g_a[-1].output_fake_quant.fake_quant_enabled[0]), "flags restored after the block"


def test_low_precision_activations_are_rounded_in_float32():
    model = calibrated_qat_model()
    fq = model.g_a[-1].output_fake_quant
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.g_a(x)
    assert y.dtype == torch.bfloat16
    q = y.float() / fq.scale + fq.zero_point
    assert (q - q.round()).abs().max() < 0.6 and q.round().min() >= 0 and q.round().max() <= 255


def test_observers_move_in_training_only_and_freeze_on_request():
    model = calibrated_qat_model()
    fq = model.g_a[-1].output_fake_quant
    before = fq.scale.clone()
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 64, 64) * 0.1)
        assert torch.equal(fq.scale, before), "eval never moves a scale"
        model.train()(torch.rand(2, 3, 64, 64) * 0.1)
        assert not torch.equal(fq.scale, before), "training observes"
        set_qat_mode(model, observe=False)
        frozen = fq.scale.clone()
        model.train()(torch.rand(2, 3, 64, 64))
        assert torch.equal(fq.scale, frozen) and qat_state(model) == "frozen scales"


def test_qat_state_dict_rebuilds_the_same_model(tmp_path):
    model = calibrated_qat_model()
    model.update(force=True)
    rebuilt, arch = model_from_checkpoint(model.state_dict(), npu_arch(True), "mem")
    assert arch["qat"] is not None
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["x_hat"], rebuilt.eval()(x)["x_hat"])
    with pytest.raises(UserError, match="QAT checkpoint"):
        model_from_base_weights(npu_arch(None), model.state_dict(), npu_arch(True), "qat.pt")
    with pytest.raises(ValueError, match="qat must be"):
        make_arch(qat={"weights": "int4"})


@pytest.fixture(scope="module")
def qat_run(prepared64, tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    ckpt = train(train_finetune_npu, prepared64, root / "run", "--qat", "true", "--qat_calib_steps", "2",
                 "--epochs", "2", "--qat_freeze_after", "3", "--amp", "false")
    return ckpt


def test_qat_training_records_scheme_and_freezes(qat_run, capsys):
    payload = read_checkpoint(qat_run)
    state, arch = state_and_arch(payload, qat_run)
    assert arch["qat"]["weights"].startswith("int8 per-channel") and payload["args"]["qat"] is True
    model, _ = model_from_checkpoint(state, arch, str(qat_run))
    assert qat_state(model) == "frozen scales", "--qat_freeze_after 3 of 4 steps"
    assert any(k.endswith("output_fake_quant.scale") for k in state)


def test_qat_resume_and_flag_rules(qat_run, prepared64, tmp_path):
    with pytest.raises(UserError, match="--qat True -> False"):
        train(train_finetune_npu, prepared64, tmp_path / "r", "--resume", str(qat_run), "--epochs", "2",
              "--extend_epochs", "1", "--qat_calib_steps", "2", "--qat_freeze_after", "3", "--amp", "false")
    with pytest.raises(UserError, match="--qat_calib_steps must be >= 1"):
        train(train_finetune_npu, prepared64, tmp_path / "c", "--qat", "true", "--qat_calib_steps", "0")


def test_qat_export_is_a_qdq_graph_with_learned_scales(qat_run, prepared64, tmp_path):
    image = str(sorted((prepared64 / "val").iterdir())[0])
    report = export_onnx.main(["--ckpt", str(qat_run), "--part", "decoder", "--out", str(tmp_path / "dec.onnx"),
                               "--input_size", "64", "--image", image, "--int8", str(prepared64 / "val")])
    ops = report["ops"]
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] >= 40
    assert not set(ops) & set(NPU_FORBIDDEN_OPS)
    int8 = report["int8"]
    assert int8["method"] == "qat" and int8["calib_images"] == 0 and int8["int8_path"] == str(tmp_path / "dec.onnx")
    assert int8["bpp_int8"] > 0 and int8["bpp_fp32"] > 0 and math.isfinite(int8["rate_change"])
    assert int8["psnr_int8"] != int8["psnr_fp32"], "the float self is another codec"
    # The graph's scales are the checkpoint's: the first QuantizeLinear after the input carries g_s's input scale.
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(tmp_path / "dec.onnx")).graph
    model, _ = model_from_checkpoint(*state_and_arch(read_checkpoint(qat_run), qat_run), "qat")
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    first_q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "y_hat")
    assert np.asarray(consts[first_q.input[1]]).reshape(-1)[0] == pytest.approx(float(model.g_s[0].input_fake_quant.scale), rel=1e-6)


def test_qat_eval_measures_the_fake_quant_codec(qat_run, prepared64):
    result = recipe_eval.main(["--coco_dir", str(prepared64), "--checkpoint", str(qat_run)])["results"][0]
    assert result["arch"]["qat"] is not None and result["mean"]["bpp_real"] > 0
