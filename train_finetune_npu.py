"""Fine-tune a CompressAI model after replacing GDN/IGDN with NPU-friendly blocks.

    python train_finetune_npu.py --coco_dir /data/coco224 --quality 3

GDN becomes ``GDNishLiteEnc`` and IGDN ``GDNishLiteDec`` (src/npu_blocks.py):
no division or square root, so the result quantises to INT8.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from torch import nn

from src.cli import run_cli
from src.engine import GdnFit, run_training
from src.model_factory import gdn_model
from src.replace_gdn_npu import replace_gdn_with_npu
from src.train_args import block_kwargs, check_block_flags, get_npu_args_parser, replacement_built_by


def build_model(args: argparse.Namespace) -> nn.Module:
    """The network this script trains: the GDN model with GDN/IGDN swapped for the blocks the flags describe.

    As in ``src/train_finetune_relu.py``: the engine reads the architecture
    description off this network and rebuilds it from that description with the starting weights.
    """
    model = gdn_model(args.model, args.quality, args.metric)
    enc, dec = block_kwargs(args)
    return replace_gdn_with_npu(model, mode=args.replace_parts, enc_kwargs=enc, dec_kwargs=dec)


def main(argv: Optional[Sequence[str]] = None):
    parser = get_npu_args_parser()
    args = parser.parse_args(argv)
    check_block_flags(parser, args)
    replace, enc_kwargs, dec_kwargs = replacement_built_by(build_model, args)
    gdn_fit = GdnFit(args.gdn_fit_steps, args.gdn_fit_images) if args.init_from_gdn else None
    return run_training(args, replace, enc_kwargs, dec_kwargs, gdn_fit)


if __name__ == "__main__":
    run_cli(main)
