"""Find the first module whose output goes non-finite or huge (``--overflow_check``).

Forward hooks record one flag tensor per module output without synchronising;
``first_bad`` then reads all flags with a single host sync per step, so the
check costs little more than the comparisons themselves.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn


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
