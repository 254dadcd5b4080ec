"""The GPU path's switches, checked on the CPU: same results, and no host read per training step."""

import copy
import math

import pytest
import torch
from compressai.entropy_models import EntropyBottleneck

from src import engine, train_finetune_relu
from src.data import to_unit_float
from src.model_factory import build_model, make_arch
from src.speed import EntropyBottleneckWithoutSync, HostReads, speed_up_model, without_host_syncs
from tests.conftest import common_args



@pytest.mark.parametrize("training", [True, False])
def test_entropy_bottleneck_without_sync_is_bit_identical(training):
    torch.manual_seed(0)
    model = build_model(make_arch(quality=1, replace="relu", replace_parts="all"))
    library = model.entropy_bottleneck
    ours = copy.deepcopy(library)
    assert without_host_syncs(ours) == 1 and type(ours) is EntropyBottleneckWithoutSync
    x = torch.randn(2, 192, 4, 6, requires_grad=True)
    torch.manual_seed(1)
    expected = library(x, training=training)
    torch.manual_seed(1)
    got = ours(x, training=training)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert torch.equal(torch.autograd.grad(expected[1].sum(), x)[0], torch.autograd.grad(got[1].sum(), x)[0])
    assert type(library) is EntropyBottleneck, "the swap works on the model it is given only"


@pytest.mark.parametrize("fused", ["true", "false"])
def test_training_step_reads_nothing_back_with_the_fused_optimizer(fused, prepared64, tmp_path, monkeypatch):
    """bf16/fp32 + fused Adam: no host read inside a training step (the log window reads once)."""
    step = engine.loop.training_step
    per_step = []

    def counted(*args, **kwargs):
        with HostReads() as reads:
            result = step(*args, **kwargs)
        per_step.append(reads.reads)
        return result

    monkeypatch.setattr(engine.loop, "training_step", counted)
    train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1", "--max_steps_per_epoch", "3",
                                         "--fused_optimizer", fused, "--log_every", "50", "--amp", "false"))
    assert len(per_step) == 3
    if fused == "true":
        assert per_step == [0, 0, 0]
    else:
        assert min(per_step) >= 1, "the per-step agreement reads the verdict back"


def run_weights(prepared64, tmp_path, monkeypatch, *flags):
    """(initial, final) floating-point weights of a 3-step fp32 run from one seed."""
    prepare = engine.setup.prepare_model
    initial = {}

    def recorded(*args, **kwargs):
        model = prepare(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()})
        return model

    monkeypatch.setattr(engine.setup, "prepare_model", recorded)
    summary = train_finetune_relu.main(common_args(prepared64, tmp_path, "--epochs", "1", "--max_steps_per_epoch",
                                                   "3", "--amp", "false", "--train_scope", "all", *flags))
    final = {k: v.detach().clone() for k, v in summary["model"].state_dict().items() if v.is_floating_point()}
    return initial, final


def global_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


# How far apart two "same" trainings may end, as a share of how far training moved the weights. Another
# convolution kernel (oneDNN picks them per CPU: channels-last, AVX-512 or AVX2) or another Adam arithmetic
# (fused) changes gradients in their last bits; Adam divides by sqrt(v), so on elements whose gradient is
# near zero that can flip the sign of a whole lr-sized update. Those elements are few: over all weights the
# difference stays a small share of the update (measured on an AVX-512 Xeon: 1.2e-6 fused, 1.5e-5 channels-last,
# where the worst single weight moved 1.1e-6). A real bug (wrong layout,
# wrong lr, a skipped step) moves the weights by a share of order 1.
SAME_TRAINING_SHARE = 0.02


@pytest.fixture(scope="module")
def plain_weights(prepared64, tmp_path_factory):
    """(initial, final) weights of the plain run both speed flags are compared with."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_weights(prepared64, tmp_path_factory.mktemp("plain"), monkeypatch)


@pytest.mark.parametrize("flags", [("--fused_optimizer", "true"), ("--channels_last", "true")])
def test_speed_flags_train_the_same_weights(flags, plain_weights, prepared64, tmp_path, monkeypatch):
    """fp32, 3 steps from one seed: the same start, and the same end relative to the size of the update."""
    initial, plain = plain_weights
    initial_fast, fast = run_weights(prepared64, tmp_path / "fast", monkeypatch, *flags)
    assert plain.keys() == fast.keys() == initial.keys()
    assert all(torch.equal(initial[k], initial_fast[k]) for k in initial), "both runs start from the same weights"
    update = global_norm(plain[k] - initial[k] for k in plain)
    apart = global_norm(plain[k] - fast[k] for k in plain)
    assert update > 0, "the plain run trained"
    assert apart <= SAME_TRAINING_SHARE * update, f"runs differ by {apart / update:.2e} of the update"


def test_compiled_transforms_match_eager_and_keep_state_dict_keys():
    """--compile: g_a/g_s compiled in place; forward to 1e-5 and gradients to 1e-4 (relative) of eager (fp32).

    The ReLU model: what is tested is ``speed_up_model``'s compile in place, which does not depend on the blocks,
    and inductor's cold compile of the NPU blocks' forward and backward cost ~60 s of CPU against ~40 s."""
    torch.manual_seed(0)
    eager = build_model(make_arch(quality=1, replace="relu", replace_parts="all")).train()
    compiled = copy.deepcopy(eager)
    speed_up_model(compiled, torch.device("cpu"), print, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.rand(2, 3, 64, 64)
    outputs = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        out = model(x)
        out["x_hat"].square().mean().backward()
        outputs.append(out)
    assert (outputs[0]["x_hat"] - outputs[1]["x_hat"]).abs().max() < 1e-5
    pairs = [(p.grad, q.grad) for p, q in zip(eager.g_a.parameters(), compiled.g_a.parameters()) if p.grad is not None]
    # Relative to the gradient's size: inductor's kernels sum in another order than oneDNN's, on every CPU differently.
    assert global_norm(p - q for p, q in pairs) <= 1e-4 * global_norm(p for p, _ in pairs)


def test_uint8_batches_become_unit_float_on_the_device():
    batch = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8).expand(2, 3, 2, 2)
    x = to_unit_float(batch, torch.device("cpu"), torch.channels_last)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
