"""Fine-tune a CompressAI model after replacing GDN/IGDN with ReLU.

    python -m src.train_finetune_relu --coco_dir /data/coco224 --quality 3 --replace_parts encoder

The recipe's NPU appendix (C): to train the NPU blocks with this script
instead, write right after the line of ``build_model`` that builds the model

    from src.replace_gdn_npu import replace_gdn_with_npu
    model = replace_gdn_with_npu(model, mode=args.replace_parts)

The ReLU swap that follows then finds no GDN left in those transforms, and
the run trains, saves and resumes the NPU network (checkpoints say ``npu``).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from torch import nn

from src.cli import run_cli
from src.engine import run_training
from src.model_factory import gdn_model
from src.replace_gdn import replace_gdn_with_relu
from src.train_args import get_args_parser, replacement_built_by


def build_model(args: argparse.Namespace) -> nn.Module:
    """The network this script trains: CompressAI's GDN model, then its GDN/IGDN swapped for ReLU.

    This is the place to change the model. Its weights do not matter here:
    the engine reads the network's architecture description off its modules
    (``src.model_factory.describe_model``: which GDN positions hold ReLU or
    GDNishLite blocks, and the blocks' options), checks that the description
    rebuilds this very network, and from then on works from the description
    alone. The starting weights (zoo, ``--base_checkpoint``, ``--resume``)
    are loaded into that rebuilt network, before the swap for GDN weights and
    after it for weights of the same architecture, and every checkpoint
    stores the description, so eval, export and resume rebuild what trained.
    """
    model = gdn_model(args.model, args.quality, args.metric)
    return replace_gdn_with_relu(model, mode=args.replace_parts)


def main(argv: Optional[Sequence[str]] = None):
    parser = get_args_parser("Fine-tune bmshj2018_factorized with GDN/IGDN replaced by ReLU.")
    args = parser.parse_args(argv)
    replace, enc_kwargs, dec_kwargs = replacement_built_by(build_model, args)
    return run_training(args, replace, enc_kwargs, dec_kwargs)


if __name__ == "__main__":
    run_cli(main)
