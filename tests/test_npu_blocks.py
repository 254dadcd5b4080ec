import io

import onnx
import pytest
import torch

from src.npu_blocks import GDNishLiteDec, GDNishLiteEnc
from src.quant.onnx_export import NPU_FORBIDDEN_OPS

pytestmark = pytest.mark.quick  # the edit loop's tier: ./run.sh test -m quick


@pytest.mark.parametrize("act", ["relu6", "hardswish"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("eca", [True, False])
def test_encoder_block_is_identity_at_init(act, residual, eca):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11) * 10
    block = GDNishLiteEnc(12, act_type=act, residual=residual, use_eca=eca).eval()
    torch.testing.assert_close(block(x), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["relu6", "hardswish"])
@pytest.mark.parametrize("residual", [True, False])
def test_decoder_block_is_identity_at_init(act, residual):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11) * 10
    block = GDNishLiteDec(12, act_type=act, residual=residual, g_min=0.25, g_max=3.0).eval()
    torch.testing.assert_close(block(x), x, atol=1e-5, rtol=1e-5)


def test_blocks_without_identity_init_change_the_input_and_learn():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6)
    assert not torch.allclose(GDNishLiteEnc(8, init_identity=False)(x), x)
    assert not torch.allclose(GDNishLiteDec(8, init_identity=False)(x), x)
    block = GDNishLiteEnc(8)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    for _ in range(2):  # the zero-initialised projection learns first, then the layers before it
        optimizer.zero_grad()
        block(x).sin().sum().backward()
        optimizer.step()
    assert block.project.weight.grad.abs().sum() > 0 and block.eca.conv.weight.grad.abs().sum() > 0
    assert block.expand.weight.grad.abs().sum() > 0
    dec = GDNishLiteDec(8)
    dec(x).pow(2).sum().backward()
    assert dec.dw.weight.grad.abs().sum() > 0


def test_decoder_gain_stays_in_bounds():
    torch.manual_seed(0)
    block = GDNishLiteDec(8, g_min=0.5, g_max=2.0, init_identity=False)
    gain = block.gain(torch.randn(4, 8, 5, 5) * 100)
    assert gain.min() >= 0.5 and gain.max() <= 2.0


def test_expansion_is_rounded_to_channels():
    assert GDNishLiteEnc(10, t=1.55).hidden == 16


@pytest.mark.parametrize("make, name", [
    (lambda: GDNishLiteEnc(8, t=0), "t"),
    (lambda: GDNishLiteEnc(8, t=-1.0), "t"),
    (lambda: GDNishLiteEnc(8, k_dw=4), "k_dw"),
    (lambda: GDNishLiteEnc(8, eca_kernel=2), "eca_kernel"),
    (lambda: GDNishLiteEnc(8, act_type="gelu"), "act_type"),
    (lambda: GDNishLiteEnc(0), "channels"),
    (lambda: GDNishLiteEnc(8, t=1.0, residual=False), "t"),
    (lambda: GDNishLiteDec(8, k=2), "k"),
    (lambda: GDNishLiteDec(8, g_min=2.0, g_max=1.0), "g_min"),
    (lambda: GDNishLiteDec(8, g_min=1.0, g_max=1.0), "g_min"),
    (lambda: GDNishLiteDec(8, act_type="swish"), "act_type"),
])
def test_invalid_arguments_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("act", ["relu6", "hardswish"])
def test_exported_blocks_use_only_npu_ops(act):
    for block in (GDNishLiteEnc(8, act_type=act, init_identity=False), GDNishLiteDec(8, act_type=act)):
        buffer = io.BytesIO()
        torch.onnx.export(block.eval(), (torch.randn(1, 8, 16, 16),), buffer, opset_version=13, dynamo=False)
        ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
        assert ops.isdisjoint(NPU_FORBIDDEN_OPS), ops & set(NPU_FORBIDDEN_OPS)
        assert "Conv" in ops


def test_blocks_fitted_to_a_nonlinear_gdn_imitate_it_better():
    from src.replace_gdn_npu import fit_blocks_to_gdn
    from src.model_factory import build_model, make_arch
    from src.replace_gdn import find_gdn_layers
    from src.replace_gdn_npu import replace_gdn_with_npu

    torch.manual_seed(0)
    gdn = build_model(make_arch(quality=1, replace="none")).eval()
    with torch.no_grad():
        for _, layer in find_gdn_layers(gdn):  # make every GDN strongly divisive (far from the identity)
            channels = layer.beta.shape[0]
            layer.gamma.data = layer.gamma_reparam.init(torch.full((channels, channels), 0.5) + torch.eye(channels))
            layer.beta.data = layer.beta_reparam.init(torch.full((channels,), 0.2))
    npu = replace_gdn_with_npu(build_model(make_arch(quality=1, replace="none")), "all")
    own = npu.state_dict()
    npu.load_state_dict({k: v for k, v in gdn.state_dict().items() if k in own}, strict=False)
    images = torch.rand(4, 3, 64, 64)
    report = fit_blocks_to_gdn(gdn, npu, images, steps=150, lr=3e-3, say=lambda _: None)
    assert len(report) == 6
    assert all(after <= before for before, after in report.values())
    assert sum(after < 0.8 * before for before, after in report.values()) >= 4, report


def test_blocks_compute_their_formula_with_non_identity_weights():
    """Closed form of both blocks with random weights (as CompressAI's tests check GDN against its formula)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    enc = GDNishLiteEnc(4, t=2.0, k_dw=3, use_eca=True, residual=True, init_identity=False)
    dec = GDNishLiteDec(4, k=3, g_min=0.5, g_max=2.0, residual=True, init_identity=False)
    for block in (enc, dec):
        for param in block.parameters():
            torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(2, 4, 8, 8)

    def hardsigmoid(z):
        return (z / 6 + 0.5).clamp(0, 1)

    h = F.conv2d(x, enc.expand.weight, enc.expand.bias).clamp(0, 6)
    h = F.conv2d(h, enc.dw.weight, enc.dw.bias, padding=1, groups=8).clamp(0, 6)
    projected = F.conv2d(h, enc.project.weight, enc.project.bias)
    z = F.conv1d(projected.mean((2, 3)).reshape(2, 1, 4), enc.eca.conv.weight, enc.eca.conv.bias, padding=1)
    expected = x + projected * 2 * hardsigmoid(z).reshape(2, 4, 1, 1)
    torch.testing.assert_close(enc(x), expected)

    z = F.conv2d(F.conv2d(x, dec.mix.weight, dec.mix.bias).clamp(0, 6), dec.scale.weight, dec.scale.bias, groups=4)
    gain = 0.5 + 1.5 * hardsigmoid(z)
    expected = x + F.conv2d(x * gain, dec.dw.weight, dec.dw.bias, padding=1, groups=4)
    torch.testing.assert_close(dec(x), expected)
    assert not torch.allclose(enc(x), x) and not torch.allclose(dec(x), x), "the weights are not the identity"


def test_eca_kernel_flows_from_its_flag_to_checkpoint_qat_and_export(tmp_path, capsys):
    """``--enc_eca_kernel``: one ``BlockOption`` in src/npu_blocks.py, and the NPU script has the flag, the
    description and the checkpoint carry it, QAT places its quantisers and export folds its gate, with no other
    module knowing it."""
    from src.checkpoint import save_checkpoint
    from src.model_factory import build_model, load_checkpoint_model, make_arch
    from src.quant.fake_quant import activation_quantisers
    from src.quant.scheme import qat_scheme
    from src.quant.symbols import gates_as_clips
    from src.train_args import block_kwargs, check_block_flags, get_npu_args_parser

    parser = get_npu_args_parser()
    args = parser.parse_args(["--coco_dir", str(tmp_path), "--enc_eca_kernel", "5"])
    check_block_flags(parser, args)
    enc, dec = block_kwargs(args)
    arch = make_arch(quality=1, replace="npu", replace_parts="all", enc_kwargs=enc, dec_kwargs=dec)
    assert arch["enc_kwargs"]["eca_kernel"] == 5 and make_arch(**arch) == arch
    model = build_model(arch)
    torch.manual_seed(0)
    with torch.no_grad():
        model.g_a[1].eca.conv.weight.normal_(0, 0.5)  # a gate that is not 1, so the fold is tested
    save_checkpoint({"state_dict": model.state_dict(), "arch": arch}, tmp_path / "npu.pt")
    loaded, loaded_arch, _ = load_checkpoint_model(tmp_path / "npu.pt")
    assert loaded_arch == arch and loaded.g_a[1].eca.conv.kernel_size == (5,)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(gates_as_clips(loaded.g_a).eval()(x), loaded.g_a.eval()(x), atol=1e-5)
    qat = build_model(dict(arch, qat=qat_scheme()))
    assert {"g_a.1.eca.pool", "g_a.1.eca.gate", "g_a.1.eca.gated"} <= set(activation_quantisers(qat))
    with pytest.raises(SystemExit):
        check_block_flags(parser, parser.parse_args(["--coco_dir", str(tmp_path), "--enc_eca_kernel", "4"]))
    assert "--enc_eca_kernel must be a positive odd integer, got 4" in capsys.readouterr().err


def test_old_descriptions_read_with_the_new_options_defaults():
    """A checkpoint written before an option existed rebuilds with the option's default (what it was built with)."""
    from src.model_factory import make_arch

    old = make_arch(quality=1, replace="npu", enc_kwargs={"t": 2.0, "k_dw": 3, "use_eca": True, "residual": True})
    assert old["enc_kwargs"] == GDNishLiteEnc.options() and old["dec_kwargs"] == GDNishLiteDec.options()
