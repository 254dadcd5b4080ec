"""The recipe's NPU appendix, snippet C, done as a user would: edit ``src/train_finetune_relu.py`` and run it.

    from src.replace_gdn_npu import replace_gdn_with_npu
    model = replace_gdn_with_npu(model, mode=args.replace_parts)

"right after the model is built": the two lines go right after the line of
the script that builds the model. The edited copy must train the NPU network
and write checkpoints that eval, export and resume rebuild as NPU.
"""

import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import export_onnx
from src import eval as recipe_eval
from src.quant import onnx_export
from src import train_finetune_relu
from src.cli import UserError

REPO = Path(__file__).resolve().parents[1]
SNIPPET = ("from src.replace_gdn_npu import replace_gdn_with_npu",
           "model = replace_gdn_with_npu(model, mode=args.replace_parts)")


def edited_script(folder: Path) -> Path:
    """A copy of src/train_finetune_relu.py with the recipe's two lines right after the model is built."""
    lines = (REPO / "src" / "train_finetune_relu.py").read_text().splitlines()
    built = [i for i, line in enumerate(lines) if re.match(r"\s*model = gdn_model\(", line)]
    assert len(built) == 1, "the script builds its model on one line"
    indent = re.match(r"\s*", lines[built[0]]).group()
    lines[built[0] + 1:built[0] + 1] = [indent + line for line in SNIPPET]
    path = folder / "train_finetune_relu.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def script_argv(data: Path, out: Path, *extra: str) -> list:
    return ["--coco_dir", str(data), "--quality", "1", "--pretrained", "false", "--epochs", "1",
            "--max_steps_per_epoch", "2", "--batch_size", "2", "--num_workers", "0", "--replace_parts", "all",
            "--save_dir", str(out / "ckpt"), "--recon_dir", str(out / "recon"), "--recon_count", "0", "--amp", "false",
            *extra]


def run_script(script: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The edited script as the user runs it: ``python path/to/script.py ...``."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(script), *script_argv(data, out, *extra)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=600)


def run_script_here(script: Path, data: Path, out: Path, *extra: str, monkeypatch) -> int:
    """The edited script run as ``__main__`` in this process (its exit code): what ``python script.py`` runs, without
    a second interpreter importing the whole stack again."""
    monkeypatch.setattr(sys, "argv", [str(script), *script_argv(data, out, *extra)])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        return stop.code
    return 0


def test_snippet_c_trains_evaluates_exports_and_resumes_the_npu_model(prepared64, tmp_path, capsys, monkeypatch):
    script = edited_script(tmp_path)
    run = run_script(script, prepared64, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "replaced: g_a.1, g_a.3, g_a.5, g_s.1, g_s.3, g_s.5" in run.stdout
    last = tmp_path / "ckpt" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["arch"]["replace"] == "npu" and ckpt["arch"]["replace_parts"] == "all"
    assert "g_a.1.expand.weight" in ckpt["state_dict"] and "g_s.1.scale.bias" in ckpt["state_dict"]

    result = recipe_eval.main(["--coco_dir", str(prepared64), "--checkpoint", str(last)])["results"][0]
    assert result["arch"]["replace"] == "npu" and result["mean"]["bpp_real"] > 0
    assert math.isfinite(result["mean"]["psnr"])
    for part in ("encoder", "decoder"):
        report = export_onnx.main(["--ckpt", str(last), "--part", part, "--out", str(tmp_path / f"{part}.onnx"),
                                   "--input_size", "64"])
        assert not set(report["ops"]) & set(onnx_export.NPU_FORBIDDEN_OPS)
        assert all(max(e.values()) < 1e-3 for e in report["errors"].values())

    capsys.readouterr()
    resumed = run_script_here(script, prepared64, tmp_path, "--resume", str(last), "--extend_epochs", "1",
                              monkeypatch=monkeypatch)
    out, err = capsys.readouterr()
    assert resumed == 0, err[-2000:]
    assert f"resumed from {last}" in out
    again = torch.load(last, weights_only=True)
    assert (again["epoch"], again["step"], again["arch"]) == (2, 4, ckpt["arch"])

    # the unedited script trains ReLU: it refuses the NPU run and names the script that resumes it
    with pytest.raises(UserError, match="is a run of npu blocks and this script trains relu blocks: resume it with "
                                        "python train_finetune_npu.py"):
        train_finetune_relu.main(["--coco_dir", str(prepared64), "--quality", "1", "--pretrained", "false",
                                  "--replace_parts", "all", "--epochs", "1", "--num_workers", "0", "--batch_size", "2",
                                  "--max_steps_per_epoch", "2", "--amp", "false",
                                  "--save_dir", str(tmp_path / "ckpt"), "--resume", str(last), "--extend_epochs", "1"])


def test_snippet_after_the_relu_swap_is_one_clear_line(prepared64, tmp_path, capsys, monkeypatch):
    """Put after the ReLU swap instead, the snippet finds no GDN left: said in one line, no silent ReLU run."""
    lines = (REPO / "src" / "train_finetune_relu.py").read_text().splitlines()
    swap = next(i for i, line in enumerate(lines) if "replace_gdn_with_relu(model" in line)
    indent = re.match(r"\s*", lines[swap]).group()
    lines[swap:swap + 1] = [indent + "model = " + lines[swap].strip().removeprefix("return "),
                            *(indent + line for line in SNIPPET), indent + "return model"]
    script = tmp_path / "late.py"
    script.write_text("\n".join(lines) + "\n")
    code = run_script_here(script, prepared64, tmp_path, monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no GDN/IGDN to replace" in err and "right after the model is built" in err
    assert not (tmp_path / "ckpt").exists()
