"""The NPU targets the project compiles for: which toolchain (and so which venv and worker) serves each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from src.cli import UserError


@dataclass(frozen=True)
class Target:
    name: str
    toolchain: str                 # folder under targets/, venv .venv-<toolchain>
    precisions: Tuple[str, ...]    # the project's profiles (src.quant.scheme.PROFILES) the hardware runs
    description: str
    eca_mean: str                  # the form of ECA's mean its compiler places (src.targets.rewrites.ECA_MEANS)


TARGETS: Dict[str, Target] = {t.name: t for t in (
    Target("ethos-u55-256", "ethosu", ("w8a8", "a16w8"), "Arm Ethos-U55, 256 MACs/cycle (Vela)", "separable"),
    Target("ethos-u65-256", "ethosu", ("w8a8", "a16w8"), "Arm Ethos-U65, 256 MACs/cycle (Vela)", "separable"),
    Target("ethos-u85-256", "ethosu", ("w8a8", "a16w8"), "Arm Ethos-U85, 256 MACs/cycle (Vela)", "separable"),
    # The separable mean's one-axis ReduceMeans made the toolkit add 4 Transposes on the CPU at 768x512
    # (encoder 39/43); the joint mean places 38/38 (docs/npu_targets.md).
    Target("rk3588", "rknn", ("w8a8", "a16w8"), "Rockchip RK3588 NPU (RKNN-Toolkit2, simulator)", "joint"),
)}


def resolve_targets(names: Sequence[str]) -> List[Target]:
    """The targets named (in order, once each); an unknown name is one line listing the known ones."""
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise UserError(f"unknown target {unknown[0]!r}: known targets are {', '.join(TARGETS)}")
    return [TARGETS[n] for n in dict.fromkeys(names)]


def check_precisions(targets: Sequence[Target], precisions: Sequence[str]) -> None:
    for target in targets:
        for precision in precisions:
            if precision not in target.precisions:
                raise UserError(f"{target.name} does not run {precision}: it runs {', '.join(target.precisions)}")


def by_form(targets: Sequence[Target]) -> Dict[str, List[Target]]:
    """The targets grouped by the graph form they compile (``eca_mean``), in order: one set of graphs per group."""
    groups: Dict[str, List[Target]] = {}
    for target in targets:
        groups.setdefault(target.eca_mean, []).append(target)
    return groups
