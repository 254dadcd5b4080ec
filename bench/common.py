"""What the benches and the demo share: one subprocess runner, one table of variants, CompressAI's objective.

- ``run``: a command of this repository, printed first (``$ python ...  > log``), its output to a log (or the
  console), one line (``CommandFailed``) with the log's tail when it fails.
- ``VARIANTS``: the GDN swaps a study trains, each by the script and flags a user would run.
- ``write_report``: a study's Markdown table and JSON record, written side by side.
- ``compressai_objective``: ``--loss_type rd --distortion mse --lambda_bpp L --max_grad_norm L``, CompressAI's
  ``lmbda * 255^2 * MSE + bpp`` on the recipe's scale (``L = 1 / lmbda``), gradients clipped where
  ``examples/train.py`` clips them (its 1.0 on a loss ``L`` times larger).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from src.cli import UserError
from src.losses import ZOO_LAMBDA_BPP

REPO = Path(__file__).resolve().parents[1]
NPU_SCRIPT = "train_finetune_npu.py"
RELU_SCRIPT = "src.train_finetune_relu"


class CommandFailed(UserError):
    """A bench's command exited non-zero (or ran out of time); the message names it and its log."""


def python(*argv: str) -> List[str]:
    """``python script.py ...`` for a path ending in .py, else ``python -m module ...``."""
    return [sys.executable, *argv] if argv[0].endswith(".py") else [sys.executable, "-m", *argv]


def shown(cmd: Sequence[str]) -> str:
    return " ".join(["python", *cmd[1:]] if cmd[0] == sys.executable else cmd)


def run(cmd: Sequence[str], log: Optional[Path] = None, cwd: Path = REPO, env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None, append: bool = False, dry_run: bool = False) -> str:
    """Run ``cmd`` (printed first); its output to ``log`` (appended with ``append``) or, without one, the console.

    Returns the output written to ``log`` ("" without one). Raises ``CommandFailed`` on a non-zero exit or a
    timeout, after printing the log's last lines to stderr.
    """
    print(f"$ {shown(cmd)}" + (f"  > {log}" if log else ""), flush=True)
    if dry_run:
        return ""
    environ = dict(os.environ, **(env or {}))
    if log is None:
        try:
            code = subprocess.run(list(cmd), cwd=cwd, env=environ, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"timed out after {timeout:g} s: {shown(cmd)}") from None
        if code != 0:
            raise CommandFailed(f"exit code {code} from: {shown(cmd)}")
        return ""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if append and log.exists() else 0
    with open(log, "a" if append else "w") as handle:
        try:
            code = subprocess.run(list(cmd), cwd=cwd, env=environ, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    with open(log, errors="replace") as handle:
        handle.seek(start)
        output = handle.read()
    if code != 0:
        tail = [line.split("\r")[-1] for line in output.splitlines()[-15:]]
        print("\n".join(tail), file=sys.stderr)
        what = f"timed out after {timeout:g} s" if code is None else f"exit code {code}"
        raise CommandFailed(f"{what} from: {shown(cmd)} (see {log})")
    return output


def write_report(folder: Path, name: str, label: str, text: str, result: Dict[str, Any], wall: float) -> None:
    """Print a study's report (ending ``LABEL: Ns wall``) and write it as ``name.md`` beside its record ``name.json``."""
    print("\n" + text + f"\n{label}: {wall:.0f}s wall")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(text)
    result["wall_s"] = wall
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))


def compressai_objective(lambda_bpp: float) -> List[str]:
    """CompressAI's training objective as the recipe's flags, at ``lambda_bpp`` (= 1 / CompressAI's lmbda)."""
    lam = f"{lambda_bpp:.6g}"
    return ["--loss_type", "rd", "--distortion", "mse", "--lambda_bpp", lam, "--max_grad_norm", lam]


def zoo_objective(quality: int) -> List[str]:
    """``compressai_objective`` at the trade-off CompressAI's zoo model of ``quality`` was trained with."""
    return compressai_objective(ZOO_LAMBDA_BPP[quality])


@dataclass(frozen=True)
class Variant:
    """One way of replacing GDN, as the user trains it: script, --replace_parts and extra flags."""

    script: str
    parts: str
    extra: tuple = ()

    @property
    def replace(self) -> str:
        """The kind written into the checkpoint's ``arch``: none (GDN kept), relu or npu."""
        return "none" if self.parts == "none" else ("npu" if self.script == NPU_SCRIPT else "relu")


VARIANTS: Dict[str, Variant] = {  # the first is the anchor of every BD figure
    "gdn_control": Variant(RELU_SCRIPT, "none"),
    "relu_encoder": Variant(RELU_SCRIPT, "encoder"),
    "relu_all": Variant(RELU_SCRIPT, "all"),
    "npu_all": Variant(NPU_SCRIPT, "all"),
    "npu_all_gdnfit": Variant(NPU_SCRIPT, "all", ("--init_from_gdn", "true")),
    # quantisation-aware NPU-all: run by bench.int8_study, which compares INT8 codecs against their FP32 selves
}
# QAT is a phase after float training (--qat true refuses a GDN base): bench.qat_study runs it from npu_all's models.
GDN_SWAP_VARIANTS = list(VARIANTS)
