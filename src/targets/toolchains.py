"""The toolchain venvs (``.venv-<toolchain>/`` from ``targets/<toolchain>/requirements.txt``) and the worker call.

A toolchain never runs in the project's ``.venv``: each worker runs in its own venv, created by
``create_venv`` (``./run.sh npu`` or ``./run.sh npu-setup``) and recognised as installed only when it was
built from the requirements file as it is now (a stamp holds that file's sha256).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from src.cli import UserError

REPO = Path(__file__).resolve().parents[2]
STAMP = "requirements.sha256"


def requirements(toolchain: str, repo: Path = REPO) -> Path:
    return repo / "targets" / toolchain / "requirements.txt"


def requirements_nodeps(toolchain: str, repo: Path = REPO) -> Path:
    """Optional second file, installed with ``--no-deps`` after the first: a toolkit whose own pins cannot be
    installed as declared (RKNN-Toolkit2 pins a CUDA torch; the CPU torch of ``requirements.txt`` stands in)."""
    return repo / "targets" / toolchain / "requirements-nodeps.txt"


def venv_dir(toolchain: str, repo: Path = REPO) -> Path:
    return repo / f".venv-{toolchain}"


def worker_script(toolchain: str, repo: Path = REPO) -> Path:
    return repo / "targets" / toolchain / "worker.py"


def install_command(toolchain: str) -> str:
    """What a user runs to install ``toolchain`` (named in every 'not installed' line)."""
    return f"./run.sh npu-setup {toolchain}"


def requirements_digest(toolchain: str, repo: Path = REPO) -> str:
    digest = hashlib.sha256(requirements(toolchain, repo).read_bytes())
    if requirements_nodeps(toolchain, repo).is_file():
        digest.update(requirements_nodeps(toolchain, repo).read_bytes())
    return digest.hexdigest()


def installed(toolchain: str, repo: Path = REPO) -> bool:
    """The venv exists and was built from the current requirements file."""
    stamp = venv_dir(toolchain, repo) / STAMP
    return stamp.is_file() and stamp.read_text().strip() == requirements_digest(toolchain, repo)


def toolchain_python(toolchain: str, repo: Path = REPO) -> Path:
    """The venv's python, or one line saying how to install the toolchain."""
    if not requirements(toolchain, repo).is_file():
        raise UserError(f"no toolchain {toolchain!r}: {requirements(toolchain, repo)} does not exist")
    if not installed(toolchain, repo):
        raise UserError(f"the {toolchain} toolchain is not installed (or its requirements changed): run "
                        f"`{install_command(toolchain)}` (creates {venv_dir(toolchain, repo).name}/ from "
                        f"targets/{toolchain}/requirements.txt)")
    return venv_dir(toolchain, repo) / "bin" / "python"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1][:300] if lines else "no output"


def create_venv(toolchain: str, repo: Path = REPO, python: str = sys.executable) -> Path:
    """Create (or update) ``.venv-<toolchain>`` from its pinned requirements; the project's ``.venv`` is untouched.

    A failed install is one line naming the command that failed and pip's last words; the stamp is written only
    after pip succeeded, so a half-installed venv is never taken for an installed one.
    """
    reqs, venv = requirements(toolchain, repo), venv_dir(toolchain, repo)
    if not reqs.is_file():
        raise UserError(f"no toolchain {toolchain!r}: {reqs} does not exist")
    if installed(toolchain, repo):
        return venv / "bin" / "python"
    (venv / STAMP).unlink(missing_ok=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    steps = [[python, "-m", "venv", str(venv)], [*pip, "-r", str(reqs)]]
    if requirements_nodeps(toolchain, repo).is_file():
        steps.append([*pip, "--no-deps", "-r", str(requirements_nodeps(toolchain, repo))])
    for command in steps:
        if command[0] != python or not (venv / "bin" / "python").exists():
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command))
                raise UserError(f"installing the {toolchain} toolchain failed: `{shown}` exited "
                                f"{done.returncode}: {last_line(done.stderr or done.stdout)}")
    (venv / STAMP).write_text(requirements_digest(toolchain, repo) + "\n")
    return venv / "bin" / "python"


def run_worker(toolchain: str, job_path: Path, repo: Path = REPO, timeout: Optional[float] = None) -> Dict:
    """Run the toolchain's worker on ``job_path`` in its venv; its ``report.json``, or its one error line."""
    python = toolchain_python(toolchain, repo)
    job = json.loads(job_path.read_text())
    command: List[str] = [str(python), str(worker_script(toolchain, repo)), str(job_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{job['target']} ({toolchain}) did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise UserError(f"{job['target']} {job['precision']}: {last_line(done.stderr).removeprefix('error: ')}")
    return json.loads((Path(job["out_dir"]) / "report.json").read_text())
