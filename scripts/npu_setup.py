"""Create the NPU toolchain venvs (``.venv-<toolchain>/``) from ``targets/<toolchain>/requirements.txt``.

    python -m scripts.npu_setup [ethosu] [rknn]        (./run.sh npu-setup)

Never touches the project's ``.venv``. A venv already built from the current requirements is kept; a failed
install is one line naming the command that failed.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

from src.cli import run_cli
from src.targets.registry import TARGETS
from src.targets.toolchains import create_venv, installed, requirements

TOOLCHAINS = tuple(dict.fromkeys(t.toolchain for t in TARGETS.values()))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Create the NPU toolchain venvs from their pinned requirements.")
    p.add_argument("toolchains", nargs="*", default=[t for t in TOOLCHAINS if requirements(t).is_file()],
                   help=f"of {', '.join(TOOLCHAINS)} (default: every one whose requirements file exists)")
    args = p.parse_args(argv)
    for toolchain in args.toolchains:
        start = time.perf_counter()
        if not installed(toolchain):
            print(f"{toolchain}: creating .venv-{toolchain} from targets/{toolchain}/ (several minutes)", flush=True)
        python = create_venv(toolchain)
        print(f"{toolchain}: ready ({python}, {time.perf_counter() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    run_cli(main)
