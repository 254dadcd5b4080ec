"""The RD study: what does each GDN swap cost in BD-rate, against a GDN control at equal budget?

    # small scale (this 2-core CPU): bases trained here from scratch, one per rate point
    python -m bench.rd_study --coco_dir ../shared/data/minicoco --eval_dir ../shared/data/kodak \\
        --work_dir bench_out/rd_study
    # published setting (a GPU box with CompressAI's weights): one zoo base per quality
    python -m bench.rd_study --coco_dir /data/coco --eval_dir kodak/ --zoo_dir ~/.cache/torch/hub/checkpoints \\
        --qualities 1 2 3 4 5 6 7 8 --work_dir bench_out/rd_study_zoo

One rate point per ``--qualities`` entry, trained with CompressAI's objective
(``--distortion mse --loss_type rd``) and CompressAI's trade-off for that
quality (``--lambda_bpp 1/lmbda``, ``src.losses.ZOO_LAMBDA_BPP``), gradients
clipped where CompressAI's ``examples/train.py`` clips them (its 1.0 on our
loss scale, i.e. ``--max_grad_norm lambda_bpp``).

1. A GDN base per rate point: the zoo's ``bmshj2018-factorized-prior-Q-*.pth.tar``
   (``--zoo_dir``) or, without it, a base trained here from scratch at that
   point's lambda (``--base_steps``).
2. From each base, with the same data, seed and budget (``--steps``), every
   variant is fine-tuned at that point's lambda: the GDN control (GDN kept,
   trained the same way), ReLU in the encoder, ReLU everywhere, NPU blocks
   everywhere (identity init) and NPU blocks with ``--init_from_gdn``. All
   parameters train (``--train_scope all``).
3. ``src.eval --curve`` on held-out full-size photos (real bitstream): each
   variant is a curve of its runs' ``best_loss.pt``; BD-rate and BD-PSNR
   (PSNR and MS-SSIM dB) against the GDN control. The GDN bases form a curve
   too: the control's gain over them is what the extra steps alone buy.

Runs that finished are skipped (a ``done`` marker), runs that were
interrupted resume from their ``last.pt``; every command is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench.common import GDN_SWAP_VARIANTS, VARIANTS
from src.cli import UserError, run_cli
from src.commands import python, run
from src.data import epochs_for_steps
from src.losses import ZOO_LAMBDA_BPP
from src.rd_curves import bd_markdown
from src.train_args import zoo_objective

SCALES = {  # crop, crops per train image, batch, base steps, fine-tune steps, base lr, fine-tune lr, amp
    "small": dict(crop=64, crops_per_image=32, batch=8, base_steps=2500, steps=500, base_lr=1e-3, lr=3e-4,
                  amp="false"),
    "zoo": dict(crop=224, crops_per_image=1, batch=16, base_steps=0, steps=5000, base_lr=0.0, lr=1e-4, amp="true"),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--coco_dir", required=True, help="COCO root (train2017/, val2017/): fine-tuning data")
    p.add_argument("--eval_dir", required=True, help="held-out full-size photos (e.g. Kodak), never trained on")
    p.add_argument("--work_dir", default="bench_out/rd_study")
    p.add_argument("--zoo_dir", default=None,
                   help="folder with CompressAI's bmshj2018-factorized-prior-Q-*.pth.tar (else bases are trained)")
    p.add_argument("--qualities", type=int, nargs="+", default=[1, 2, 3, 4], help="one rate point each")
    p.add_argument("--variants", nargs="+", default=GDN_SWAP_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default: by scale)")
    p.add_argument("--base_steps", type=int, default=None, help="from-scratch base steps (default: by scale)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return p


class Study:
    """Runs the study's commands (printed first), skipping what is done, resuming what was cut."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.scale = dict(SCALES["zoo" if args.zoo_dir else "small"])
        self.scale["steps"] = args.steps or self.scale["steps"]
        self.scale["base_steps"] = args.base_steps or self.scale["base_steps"]
        self.work = Path(args.work_dir)
        self.data = self.work / f"crops{self.scale['crop']}"

    def command(self, argv: List[str], log: Path) -> None:
        run(python(*argv), log, cwd=Path.cwd(), append=True, dry_run=self.args.dry_run)

    def prepare(self) -> None:
        self.command(["scripts.coco_prepare", "--coco_dir", self.args.coco_dir, "--out_dir", str(self.data),
                      "--crop_size", str(self.scale["crop"]), "--crops_per_image",
                      str(self.scale["crops_per_image"]), "--seed", str(self.args.seed)], self.work / "prepare.log")

    def run_flags(self, quality: int, steps: int) -> List[str]:
        """Flags every training run shares: whole epochs adding up to about ``steps`` optimizer steps."""
        train_crops = len(list((self.data / "train").glob("*.png"))) or self.scale["crops_per_image"]
        epochs = epochs_for_steps(steps, train_crops, self.scale["batch"])
        return ["--coco_dir", str(self.data), "--quality", str(quality), "--pretrained", "false",
                "--epochs", str(epochs), "--batch_size", str(self.scale["batch"]),
                "--num_workers", str(self.args.workers), "--seed", str(self.args.seed),
                *zoo_objective(quality), "--amp", self.scale["amp"], "--train_scope", "all",
                "--sched", "cosine", "--recon_count", "2", "--recon_every", str(epochs), "--log_every", "100"]

    def train(self, script: str, run_dir: Path, flags: List[str], start_from: Optional[Path]) -> Path:
        """One training run into ``run_dir``: skipped when done, resumed when cut short."""
        done = run_dir / "done"
        if done.exists():
            print(f"# done already: {run_dir}")
        else:
            out = ["--save_dir", str(run_dir), "--recon_dir", str(run_dir / "recon")]
            if (run_dir / "last.pt").exists():
                origin = ["--resume", str(run_dir / "last.pt")]
            else:
                origin = ["--base_checkpoint", str(start_from)] if start_from else []
            self.command([script, *flags, *out, *origin], run_dir / "train.log")
            if not self.args.dry_run:
                done.write_text("ok\n")
        return run_dir / "best_loss.pt"

    def base(self, quality: int) -> Path:
        if self.args.zoo_dir:
            found = sorted(Path(self.args.zoo_dir).glob(f"bmshj2018-factorized-prior-{quality}-*.pth.tar"))
            if not found:
                raise UserError(f"--zoo_dir {self.args.zoo_dir} has no bmshj2018-factorized-prior-{quality}-*.pth.tar")
            return found[0]
        flags = self.run_flags(quality, self.scale["base_steps"])
        flags += ["--replace_parts", "none", "--lr", str(self.scale["base_lr"]), "--lr_warmup_steps", "100"]
        return self.train("src.train_finetune_relu", self.work / "base" / f"q{quality}", flags, None)

    def finetune(self, variant: str, quality: int, base: Path) -> Path:
        v = VARIANTS[variant]
        flags = self.run_flags(quality, self.scale["steps"])
        flags += ["--replace_parts", v.parts, "--lr", str(self.scale["lr"]), "--lr_warmup_steps", "20", *v.extra]
        return self.train(v.script, self.work / variant / f"q{quality}", flags, base)

    def evaluate(self, curves: Dict[str, List[Path]]) -> Dict:
        """``python -m src.eval --curve ...`` over the held-out photos; its JSON report."""
        report = self.work / "rd_study.json"
        argv = ["src.eval", "--image_dir", self.args.eval_dir, "--json", str(report),
                "--plot", str(self.work / "rd_study.png")]
        for name, checkpoints in curves.items():
            argv += ["--curve", f"{name}={','.join(map(str, checkpoints))}"]
        report.unlink(missing_ok=True)
        self.command(argv, self.work / "eval.log")
        if self.args.dry_run:
            return {}
        print(eval_summary((self.work / "eval.log").read_text()))
        return json.loads(report.read_text())


def eval_summary(log: str) -> str:
    """The eval log without its progress bars: the curves' points and BD figures."""
    lines = [line.split("\r")[-1] for line in log.splitlines()]
    return "\n".join(line for line in lines if line.strip() and "it/s" not in line and "s/it" not in line)


def main(argv: Optional[List[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    for q in args.qualities:
        if q not in ZOO_LAMBDA_BPP:
            raise UserError(f"--qualities takes 1..8, got {q}")
    if "gdn_control" not in args.variants:
        raise UserError("--variants must include gdn_control: it is the anchor of every BD figure")
    start = time.perf_counter()
    study = Study(args)
    study.work.mkdir(parents=True, exist_ok=True)
    study.prepare()
    bases = {q: study.base(q) for q in args.qualities}
    curves: Dict[str, List[Path]] = {v: [] for v in args.variants}
    for q in args.qualities:
        for variant in args.variants:
            curves[variant].append(study.finetune(variant, q, bases[q]))
    if not args.zoo_dir:
        curves["gdn_base"] = [bases[q] for q in args.qualities]
    report = study.evaluate(curves)
    wall = time.perf_counter() - start
    if report:
        print("\n" + bd_markdown(report["curves"]["bd"]))
        (study.work / "rd_study_table.md").write_text(bd_markdown(report["curves"]["bd"]) + "\n")
    print(f"\nrd study: {wall:.0f}s wall ({len(args.qualities)} rate points x {len(args.variants)} variants"
          f"{'' if args.zoo_dir else ' + bases'}); outputs in {study.work}")
    (study.work / "wall_time.json").write_text(json.dumps({"seconds": wall}))


if __name__ == "__main__":
    run_cli(main)
