import io

import onnx
import pytest
import torch
from compressai.zoo import image_models
from torch import nn

from src.cli import UserError
from src.model_factory import build_model, load_weights, make_arch
from src.npu_blocks import GDNishLiteDec, GDNishLiteEnc
from src.quant.onnx_export import NPU_FORBIDDEN_OPS
from src.replace_gdn import find_gdn_layers, replace_gdn_with_relu, set_trainable_parts
from src.replace_gdn_npu import replace_gdn_with_npu

pytestmark = pytest.mark.quick  # the edit loop's tier: ./run.sh test -m quick

MODELS = ["bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean"]
LEFT = {"none": (3, 3), "encoder": (0, 3), "decoder": (3, 0), "all": (0, 0)}


def fresh(name="bmshj2018-factorized"):
    torch.manual_seed(0)
    return image_models[name](quality=1, pretrained=False)


def gdn_left(model):
    return len(find_gdn_layers(model, ("g_a",))), len(find_gdn_layers(model, ("g_s",)))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["none", "encoder", "decoder", "all"])
def test_relu_replacement_counts_and_shapes(name, mode):
    model = fresh(name).eval()
    x = torch.rand(1, 3, 64, 64)
    before = model(x)
    replace_gdn_with_relu(model, mode)
    assert gdn_left(model) == LEFT[mode]
    assert len(model.replaced_gdn) == 6 - sum(LEFT[mode])
    assert all(isinstance(model.get_submodule(p), nn.ReLU) for p in model.replaced_gdn)
    after = model(x)
    assert after["x_hat"].shape == before["x_hat"].shape
    for key in before["likelihoods"]:
        assert after["likelihoods"][key].shape == before["likelihoods"][key].shape


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["encoder", "decoder", "all"])
def test_npu_replacement_picks_block_by_gdn_direction(name, mode):
    model = replace_gdn_with_npu(fresh(name), mode)
    assert gdn_left(model) == LEFT[mode]
    for path in model.replaced_gdn:
        expected = GDNishLiteEnc if path.startswith("g_a") else GDNishLiteDec
        assert isinstance(model.get_submodule(path), expected)
    assert model(torch.rand(1, 3, 64, 64))["x_hat"].shape == (1, 3, 64, 64)


def test_npu_swap_changes_nothing_but_gdn_removal():
    """Identity-initialised blocks: the NPU model equals the model with GDN layers made identities."""
    model = fresh().eval()
    reference = replace_gdn_with_relu(fresh().eval(), "none")
    for name, _ in find_gdn_layers(reference):
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, nn.Identity())
    replace_gdn_with_npu(model, "all", {"residual": False}, {"residual": False})
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(model(x)["x_hat"], reference(x)["x_hat"], atol=1e-4, rtol=1e-4)


def test_invalid_mode():
    with pytest.raises(ValueError, match="replace mode"):
        replace_gdn_with_relu(fresh(), "middle")


@pytest.mark.parametrize("mode, scope, trains", [
    ("encoder", "replaced", {"g_a"}),
    ("decoder", "replaced", {"g_s"}),
    ("all", "replaced", {"g_a", "g_s"}),
    ("encoder", "replaced+hyper", {"g_a", "entropy_bottleneck"}),
    ("encoder", "all", {"g_a", "g_s", "entropy_bottleneck"}),
    ("none", "all", {"g_a", "g_s", "entropy_bottleneck"}),
])
def test_one_step_changes_only_the_trainable_scope(mode, scope, trains):
    model = replace_gdn_with_relu(fresh(), mode)
    params = set_trainable_parts(model, scope, mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(params, lr=0.1)
    out = model(torch.rand(2, 3, 64, 64))
    loss = out["x_hat"].square().mean() + sum(lk.log().mean().neg() for lk in out["likelihoods"].values())
    (loss + model.aux_loss()).backward()
    optimizer.step()
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trains


def test_scope_is_read_from_the_model_when_mode_is_omitted():
    model = replace_gdn_with_npu(fresh(), "decoder")
    set_trainable_parts(model, "replaced")
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"g_s"}
    with pytest.raises(ValueError, match="nothing to train"):
        set_trainable_parts(fresh(), "replaced")


def test_hyper_scope_includes_hyperprior():
    model = replace_gdn_with_relu(fresh("bmshj2018-hyperprior"), "encoder")
    set_trainable_parts(model, "replaced+hyper", "encoder")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"g_a", "h_a", "h_s", "entropy_bottleneck"}


def test_scope_that_trains_nothing_is_an_error():
    with pytest.raises(ValueError, match="nothing to train"):
        set_trainable_parts(fresh(), "replaced", "none")


@pytest.mark.parametrize("quality", [0, 9])
def test_quality_out_of_range(quality):
    with pytest.raises(ValueError, match="1..8"):
        make_arch(quality=quality)


@pytest.mark.parametrize("replace, parts", [("none", "none"), ("relu", "encoder"), ("npu", "all")])
def test_rebuild_from_description_is_bit_identical(replace, parts):
    arch = make_arch(quality=1, replace=replace, replace_parts=parts,
                     enc_kwargs={"t": 1.5} if replace == "npu" else None)
    torch.manual_seed(1)
    model = build_model(arch).eval()
    for p in model.parameters():  # move away from the identity init so the check means something
        p.data.add_(0.01 * torch.randn_like(p))
    model.update(force=True)
    rebuilt = load_weights(build_model(arch), model.state_dict(), "test").eval()
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(model(x)["x_hat"], rebuilt(x)["x_hat"])
    assert rebuilt.compress(x)["strings"] == model.compress(x)["strings"]


def test_loading_other_architecture_lists_mismatched_keys():
    relu = build_model(make_arch(quality=1, replace="relu", replace_parts="all"))
    npu = build_model(make_arch(quality=1, replace="npu", replace_parts="all"))
    with pytest.raises(UserError, match=r"unexpected: g_a\.1\.dw\.bias.*\(42 in all\)"):
        load_weights(relu, npu.state_dict(), "npu.pt")
    q2 = build_model(make_arch(quality=6, replace="relu"))
    with pytest.raises(UserError, match="wrong shape"):
        load_weights(relu, q2.state_dict(), "q6.pt")


@pytest.mark.parametrize("part", ["g_a", "g_s"])
def test_npu_transforms_export_without_forbidden_ops(part):
    model = build_model(make_arch(quality=1, replace="npu", replace_parts="all")).eval()
    x = torch.rand(1, 3, 64, 64) if part == "g_a" else torch.rand(1, 192, 4, 4)
    buffer = io.BytesIO()
    torch.onnx.export(getattr(model, part), (x,), buffer, opset_version=13, dynamo=False)
    ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert ops.isdisjoint(NPU_FORBIDDEN_OPS)
    gdn = build_model(make_arch(quality=1, replace="none")).eval()
    buffer = io.BytesIO()
    torch.onnx.export(getattr(gdn, part), (x,), buffer, opset_version=13, dynamo=False)
    gdn_ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert gdn_ops & {"Sqrt", "Div", "Pow"}, "the audit must be able to see GDN's ops"


def test_npu_replacement_lives_under_the_recipes_module_name():
    """The recipe's NPU appendix (A) ships ``src/replace_gdn_npu.py`` with ``replace_gdn_with_npu(model, mode=...)``."""
    import src.replace_gdn_npu as recipe_module

    model = recipe_module.replace_gdn_with_npu(fresh(), mode="encoder")
    assert {type(model.get_submodule(p)) for p in model.replaced_gdn} == {GDNishLiteEnc}
    assert callable(recipe_module.fit_blocks_to_gdn)
    assert model.npu_block_kwargs == {p: {} for p in ("g_a.1", "g_a.3", "g_a.5")}


def test_npu_replacement_of_a_model_without_gdn_left_is_an_error():
    model = replace_gdn_with_relu(fresh(), "all")
    with pytest.raises(ValueError, match=r"no GDN/IGDN to replace \(g_a\.1, .* were replaced already\)"):
        replace_gdn_with_npu(model, mode="encoder")
    assert replace_gdn_with_npu(fresh(), mode="none").replaced_gdn == ()


@pytest.mark.parametrize("swap, expected", [
    (lambda m: m, ("none", "none", {}, {})),
    (lambda m: replace_gdn_with_relu(m, "decoder"), ("relu", "decoder", {}, {})),
    (lambda m: replace_gdn_with_relu(replace_gdn_with_npu(m, mode="all"), "all"), ("npu", "all", {}, {})),
    (lambda m: replace_gdn_with_npu(m, "encoder", {"t": 1.5, "use_eca": False}), ("npu", "encoder",
                                                                                  {"t": 1.5, "use_eca": False}, {})),
    (lambda m: replace_gdn_with_npu(m, "all", None, {"g_min": 0.3, "k": 5}), ("npu", "all", {},
                                                                              {"g_min": 0.3, "k": 5})),
])
def test_description_is_read_off_the_modules(swap, expected):
    from src.model_factory import describe_model

    model = swap(fresh())
    arch = describe_model(model, quality=1)
    replace, parts, enc, dec = expected
    if replace == "npu":  # the description holds every option of the blocks, the defaults filled in
        enc, dec = GDNishLiteEnc.options(enc), GDNishLiteDec.options(dec)
    assert (arch["replace"], arch["replace_parts"], arch["enc_kwargs"], arch["dec_kwargs"]) == (replace, parts, enc, dec)
    rebuilt = load_weights(build_model(arch), model.state_dict(), "test")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(model.eval()(x)["x_hat"], rebuilt.eval()(x)["x_hat"])


def test_a_network_the_description_cannot_rebuild_is_refused():
    from src.model_factory import describe_model

    mixed = replace_gdn_with_npu(replace_gdn_with_relu(fresh(), "decoder"), "encoder")
    with pytest.raises(ValueError, match="one replacement kind per model"):
        describe_model(mixed, quality=1)
    half = fresh()
    half.g_a[3] = nn.ReLU()
    with pytest.raises(ValueError, match="g_a mixes none and relu"):
        describe_model(half, quality=1)
    by_hand = replace_gdn_with_npu(fresh(), "all")
    by_hand.g_s[1] = GDNishLiteDec(128, g_min=0.3)  # not made by replace_gdn_with_npu: its options are not recorded
    with pytest.raises(ValueError, match="'g_s.1' differs in g_min"):
        describe_model(by_hand, quality=1)
    odd = fresh()
    odd.g_a[1] = nn.GELU()
    with pytest.raises(ValueError, match="holds GELU"):
        describe_model(odd, quality=1)


@pytest.mark.parametrize("text", ["0", "9", "-1", "three"])
def test_quality_index_says_compressai_has_1_to_8(text):
    import argparse

    from src.model_factory import quality_index

    with pytest.raises(argparse.ArgumentTypeError, match=f"CompressAI's qualities are 1-8, got {text}"):
        quality_index(text)
    assert quality_index("1") == 1
