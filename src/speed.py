"""The GPU path's switches: fused optimizers, cuDNN autotuning, channels-last, torch.compile, no host syncs.

Each switch leaves the results the same (bit-identical, or within a stated
tolerance, each tested on the CPU) and only changes how fast a GPU runs them.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from compressai.entropy_models import EntropyBottleneck
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode


def use_fused_optimizer(choice: str, device: torch.device) -> bool:
    """``--fused_optimizer`` auto/true/false: auto = on for CUDA (one kernel per step, not several per tensor list).

    A fused Adam also takes a ``found_inf`` tensor, which lets a bf16/fp32 run
    skip a bad step on the device (``src.engine.step.step_optimizers``).
    """
    return device.type == "cuda" if choice == "auto" else choice == "true"


class EntropyBottleneckWithoutSync(EntropyBottleneck):
    """CompressAI's ``EntropyBottleneck`` whose ``forward`` builds its axis permutation on the host.

    CompressAI 1.2.8 builds the (B, C, ...) -> (C, B, ...) permutation as a
    tensor on the input's device and unpacks it into ``permute``: on a GPU
    that is a device-to-host read, a sync, on every forward. The permutation
    only depends on the number of dimensions, so here it is a tuple. Every
    other step is the library's own (``quantize``, ``_likelihood``, the
    likelihood bound), in the same order: outputs and likelihoods are
    bit-identical (tested).
    """

    def forward(self, x: Tensor, training: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
        if training is None:
            training = self.training
        perm = (1, 0, *range(2, x.ndim))  # swaps the first two axes: its own inverse
        x = x.permute(*perm).contiguous()
        shape = x.size()
        outputs = self.quantize(x.reshape(shape[0], 1, -1), "noise" if training else "dequantize",
                                self._get_medians())
        likelihood, _, _ = self._likelihood(outputs)
        if self.use_likelihood_bound:
            likelihood = self.likelihood_lower_bound(likelihood)
        return (outputs.reshape(shape).permute(*perm).contiguous(),
                likelihood.reshape(shape).permute(*perm).contiguous())


class HostReads(TorchDispatchMode):
    """Counts tensor -> Python number reads of tensors on ``device_type`` (all devices when None).

    Every such read (``item``, ``bool``, an int argument unpacked from a tensor
    in C++) dispatches ``aten._local_scalar_dense``; on a GPU each read of a
    device tensor is a host sync. The tests and ``bench/gpu_check.sh`` count them.
    """

    def __init__(self, device_type: Optional[str] = None):
        super().__init__()
        self.device_type, self.reads = device_type, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.device_type in (None, args[0].device.type):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def without_host_syncs(model: nn.Module) -> int:
    """Swap every plain ``EntropyBottleneck`` for ``EntropyBottleneckWithoutSync`` (same state); returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is EntropyBottleneck:
            module.__class__ = EntropyBottleneckWithoutSync
            swapped += 1
    return swapped


def speed_up_model(model: nn.Module, device: torch.device, say: Callable[[str], None], channels_last: bool = False,
                   compile: bool = False) -> None:
    """cuDNN autotuning on CUDA, then ``--channels_last`` and ``--compile`` (g_a, g_s) as asked.

    The crops have one fixed size, so cuDNN's per-shape autotuning pays off
    after the first step. ``Module.compile`` compiles in place: the state dict
    keeps its keys (checkpoints stay loadable without torch.compile), and the
    entropy model stays eager.
    """
    done = []
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        done.append("cudnn.benchmark")
    if channels_last:
        model.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if compile:
        for name in ("g_a", "g_s"):
            getattr(model, name).compile()
        done.append("torch.compile(g_a, g_s)")
    if done:
        say(f"speed: {', '.join(done)}")
