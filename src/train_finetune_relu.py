"""Fine-tune a CompressAI model after replacing GDN/IGDN with ReLU.

    python -m src.train_finetune_relu --coco_dir /data/coco224 --quality 3 --replace_parts encoder
"""

from __future__ import annotations

from typing import Optional, Sequence

from src.cli import run_cli
from src.engine import run_training
from src.train_args import get_args_parser


def main(argv: Optional[Sequence[str]] = None):
    parser = get_args_parser("Fine-tune bmshj2018_factorized with GDN/IGDN replaced by ReLU.")
    return run_training(parser.parse_args(argv), replace="relu")


if __name__ == "__main__":
    run_cli(main)
