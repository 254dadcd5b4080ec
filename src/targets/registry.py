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


TARGETS: Dict[str, Target] = {t.name: t for t in (
    Target("ethos-u55-256", "ethosu", ("w8a8", "a16w8"), "Arm Ethos-U55, 256 MACs/cycle (Vela)"),
    Target("ethos-u65-256", "ethosu", ("w8a8", "a16w8"), "Arm Ethos-U65, 256 MACs/cycle (Vela)"),
    Target("ethos-u85-256", "ethosu", ("w8a8", "a16w8"), "Arm Ethos-U85, 256 MACs/cycle (Vela)"),
    Target("rk3588", "rknn", ("w8a8", "a16w8"), "Rockchip RK3588 NPU (RKNN-Toolkit2, simulator)"),
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
