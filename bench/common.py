"""What the benches share: one table of variants and the report writer.

- ``VARIANTS``: the GDN swaps a study trains, each by the script and flags a user would run.
- ``write_report``: a study's Markdown table and JSON record, written side by side.

The subprocess runner (``src.commands.run``) and CompressAI's objective as flags
(``src.train_args.zoo_objective``) live in ``src/``: the demo uses them too, and nothing outside
``bench/`` imports ``bench``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

NPU_SCRIPT = "train_finetune_npu.py"
RELU_SCRIPT = "src.train_finetune_relu"


def write_report(folder: Path, name: str, label: str, text: str, result: Dict[str, Any], wall: float) -> None:
    """Print a study's report (ending ``LABEL: Ns wall``) and write it as ``name.md`` beside its record ``name.json``."""
    print("\n" + text + f"\n{label}: {wall:.0f}s wall")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(text)
    result["wall_s"] = wall
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))


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
