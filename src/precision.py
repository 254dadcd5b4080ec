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
from typing import Callable, List, Sequence, Tuple

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
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


def make_grad_scaler(device_type: str, enabled: bool, dtype_name: str) -> torch.amp.GradScaler:
    """Loss scaling only for fp16; with bf16 or no AMP the scaler is a pass-through."""
    return torch.amp.GradScaler(device_type, enabled=enabled and dtype_name == "fp16")


def _selected(name: str, module: nn.Module, policy: str, custom: Sequence[str]) -> bool:
    cls = type(module).__name__
    if policy == "custom":
        return any(part in cls for part in custom)
    if isinstance(module, _ENTROPY_TYPES):
        return True
    if policy in ("entropy+decoder", "all_normexp"):
        if name == "g_s" or "Softmax" in cls:
            return True
    if policy == "all_normexp":
        return isinstance(module, GDN) or any(part in cls for part in _NORMEXP_NAME_PARTS)
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


def run_in_fp32(module: nn.Module) -> None:
    """Make ``module.forward`` run with autocast disabled on float32 inputs.

    The forward is wrapped on the instance, so parameters, state-dict keys and
    the module tree stay exactly as they were (checkpoints are unaffected).
    """
    original = module.forward

    @functools.wraps(original)
    def forward_fp32(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        with torch.autocast(device_type=device.type, enabled=False):
            args = tuple(_to_fp32(a) for a in args)
            kwargs = {k: _to_fp32(v) for k, v in kwargs.items()}
            return original(*args, **kwargs)

    module.forward = forward_fp32


def apply_local_fp32(model: nn.Module, policy: str, custom: Sequence[str] = ()) -> List[str]:
    """Wrap the modules chosen by ``policy``; returns their names."""
    chosen = local_fp32_modules(model, policy, custom)
    for _, module in chosen:
        run_in_fp32(module)
    return [name for name, _ in chosen]
