"""Mixed precision: one autocast context, one GradScaler, and FP32 islands.

bf16 has fp32's range, so it needs no loss scaling; fp16 does (GradScaler,
with ``unscale_`` before clipping). Some modules are fragile in low precision:
CompressAI's entropy models evaluate CDFs whose likelihoods are clamped at
1e-9, which underflows in fp16 and is coarse in bf16. ``--local_fp32`` runs
the chosen modules with autocast disabled and float32 inputs.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_DTYPE_CHOICES = ("auto", *AMP_DTYPES)
LOCAL_FP32_POLICIES = ("none", "entropy", "entropy+decoder", "all_normexp", "custom")
_ENTROPY_TYPES = (EntropyBottleneck, GaussianConditional)
_NORMEXP_NAME_PARTS = ("Norm", "Softmax", "Exp", "Log")


def autocast_context(device_type: str, enabled: bool, dtype_name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the training autocast context (a no-op context when AMP is off)."""
    if not enabled:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device_type, dtype=AMP_DTYPES[dtype_name])


def check_amp_support(device: torch.device, enabled: bool, dtype_name: str) -> None:
    """Run one tiny conv under the requested autocast; raise ValueError if this device/build cannot.

    Some GPUs (pre-Ampere) have no bf16, and some torch builds no CPU fp16
    autocast: better one clear line at start-up than a crash at step 1.
    """
    if not enabled:
        return
    try:
        with torch.autocast(device_type=device.type, dtype=AMP_DTYPES[dtype_name]):
            conv = nn.Conv2d(1, 1, 1).to(device)
            conv(torch.ones(1, 1, 2, 2, device=device)).sum().item()
        if device.type == "cuda" and dtype_name == "bf16" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("this GPU has no bf16 support")
    except RuntimeError as err:
        raise ValueError(f"--amp_dtype {dtype_name} does not work on {device.type} here "
                         f"({str(err).splitlines()[0][:120]}); use --amp_dtype "
                         f"{'fp16' if dtype_name == 'bf16' else 'bf16'} or --amp false") from None


def resolve_amp_dtype(device: torch.device, requested: str) -> Tuple[str, str]:
    """(``bf16`` or ``fp16``, why) for ``--amp_dtype auto``; an explicit choice is kept.

    ``torch.cuda.is_bf16_supported()`` also says yes on pre-Ampere GPUs, where
    bf16 is emulated and slow: the compute capability decides instead (bf16
    from 8.0, Ampere, on). The CPU runs bf16 autocast (no loss scale needed).
    """
    if requested != "auto":
        return requested, "as asked"
    if device.type != "cuda":
        return "bf16", f"{device.type}: bf16 autocast, no loss scaling"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return "bf16", f"compute capability {major}.{minor} runs bf16 natively"
    return "fp16", f"compute capability {major}.{minor} has no native bf16: fp16 with GradScaler"


def make_grad_scaler(device_type: str, enabled: bool, dtype_name: str) -> torch.amp.GradScaler:
    """Loss scaling only for fp16; with bf16 or no AMP the scaler is a pass-through."""
    return torch.amp.GradScaler(device_type, enabled=enabled and dtype_name == "fp16")


def _risky(module: nn.Module) -> bool:
    """A normalisation or exp/log-type layer: GDN/IGDN, *Norm*, Softmax/LogSoftmax, Exp/Log modules."""
    cls = type(module).__name__
    return isinstance(module, GDN) or any(part in cls for part in _NORMEXP_NAME_PARTS)


def _selected(name: str, module: nn.Module, policy: str, custom: Sequence[str]) -> bool:
    """Whether ``policy`` runs ``module`` in FP32 (the README's table, one mode per line).

    - ``entropy``: the entropy models;
    - ``entropy+decoder``: also the risky layers of the decoder side (IGDN, norm and exp/log-type
      modules inside ``g_s``/``h_s``), not its convolutions;
    - ``all_normexp``: also every risky layer anywhere (GDN and IGDN included);
    - ``custom``: the modules whose class name contains one of ``custom``.
    """
    if policy == "custom":
        return any(part in type(module).__name__ for part in custom)
    if isinstance(module, _ENTROPY_TYPES):
        return True
    if policy == "entropy+decoder":
        return name.startswith(("g_s.", "h_s.")) and _risky(module)
    if policy == "all_normexp":
        return _risky(module)
    return False


def local_fp32_modules(model: nn.Module, policy: str, custom: Sequence[str] = ()) -> List[Tuple[str, nn.Module]]:
    """Outermost modules chosen by ``policy`` (a module inside a chosen one is covered by it)."""
    if policy not in LOCAL_FP32_POLICIES:
        raise ValueError(f"local_fp32 must be one of {LOCAL_FP32_POLICIES}, got {policy!r}")
    if policy == "none":
        return []
    chosen: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer, _ in chosen):
            continue
        if _selected(name, module, policy, custom):
            chosen.append((name, module))
    return chosen


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


class _RunsInFP32:
    """Mixin: ``forward`` with autocast disabled, on float32 inputs."""

    def forward(self, *args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        with torch.autocast(device_type=device.type, enabled=False):
            args = tuple(_to_fp32(a) for a in args)
            kwargs = {k: _to_fp32(v) for k, v in kwargs.items()}
            return super().forward(*args, **kwargs)


def _fp32_class(cls: type) -> type:
    """``cls`` with ``_RunsInFP32`` in front, made once and kept here by name so that pickle finds it."""
    name = f"{cls.__name__}FP32"
    made = globals().get(name)
    if made is None or made.__bases__ != (_RunsInFP32, cls):
        made = type(name, (_RunsInFP32, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = made
    return made


def run_in_fp32(module: nn.Module) -> None:
    """Make ``module`` run with autocast disabled on float32 inputs.

    The module's class is swapped for a subclass whose ``forward`` does that:
    parameters, state-dict keys and the module tree stay as they were
    (checkpoints are unaffected), and ``copy.deepcopy`` or pickle of the model
    keep the behaviour and the copy's own weights (an instance-level forward
    would still point at the original's).
    """
    if not isinstance(module, _RunsInFP32):
        module.__class__ = _fp32_class(type(module))


def apply_local_fp32(model: nn.Module, policy: str, custom: Sequence[str] = ()) -> List[str]:
    """Wrap the modules chosen by ``policy``; returns their names."""
    chosen = local_fp32_modules(model, policy, custom)
    for _, module in chosen:
        run_in_fp32(module)
    return [name for name, _ in chosen]


# ---------------------------------------------------------------- overflow check (--overflow_check)
# Find the first module whose output goes non-finite or huge (``--overflow_check``).
#
# Forward hooks record one flag tensor per module output without synchronising;
# ``first_bad`` then reads all flags with a single host sync per step, so the
# check costs little more than the comparisons themselves.

def _tensors(output) -> Iterator[torch.Tensor]:
    """Every tensor in a module output (tensor, tuple/list, or CompressAI's nested dicts)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from _tensors(value)


class OverflowMonitor:
    def __init__(self, model: nn.Module, tol: float = 1e8):
        self.tol = tol
        self.flags: List[Tuple[str, torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook(name))
                        for name, m in model.named_modules() if name]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            for t in _tensors(output):
                if t.is_floating_point() and t.numel():
                    t = t.detach()
                    self.flags.append((name, ~torch.isfinite(t).all() | (t.abs().amax() > self.tol)))
        return hook

    def reset(self) -> None:
        self.flags.clear()

    def first_bad(self) -> Optional[str]:
        """Name of the first module (in execution order) with a bad output, or None."""
        if not self.flags:
            return None
        bad = torch.stack([flag for _, flag in self.flags]).cpu()
        hits = bad.nonzero()
        return self.flags[int(hits[0])][0] if len(hits) else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
