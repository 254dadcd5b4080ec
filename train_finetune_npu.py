"""Fine-tune a CompressAI model after replacing GDN/IGDN with NPU-friendly blocks.

    python train_finetune_npu.py --coco_dir /data/coco224 --quality 3

GDN becomes ``GDNishLiteEnc`` and IGDN ``GDNishLiteDec`` (src/npu_blocks.py):
no division or square root, so the result quantises to INT8.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from torch import nn

from src.cli import run_cli, str2bool
from src.engine import run_training
from src.model_factory import gdn_model
from src.replace_gdn_npu import replace_gdn_with_npu
from src.train_args import get_args_parser, replacement_built_by, show_every_default


def get_npu_args_parser():
    parser = get_args_parser("Fine-tune bmshj2018_factorized with GDN/IGDN replaced by GDNishLite blocks.",
                             save_dir="./checkpoints_npu", recon_dir="./recon_npu", replace_parts="all")
    g = parser.add_argument_group("NPU blocks")
    g.add_argument("--enc_t", type=float, default=2.0, help="GDNishLiteEnc expansion ratio")
    g.add_argument("--enc_kdw", type=int, default=3, help="GDNishLiteEnc depthwise kernel")
    g.add_argument("--enc_eca", type=str2bool, default=True, help="GDNishLiteEnc channel attention")
    g.add_argument("--enc_residual", type=str2bool, default=True)
    g.add_argument("--dec_k", type=int, default=3, help="GDNishLiteDec depthwise kernel")
    g.add_argument("--dec_gmin", type=float, default=0.5, help="GDNishLiteDec minimum gain")
    g.add_argument("--dec_gmax", type=float, default=2.0, help="GDNishLiteDec maximum gain")
    g.add_argument("--dec_residual", type=str2bool, default=True)
    g.add_argument("--init_from_gdn", type=str2bool, default=False,
                   help="fit each block to the GDN/IGDN it replaces (block-wise regression) before fine-tuning")
    g.add_argument("--gdn_fit_steps", type=int, default=300, help="regression steps per block")
    g.add_argument("--gdn_fit_images", type=int, default=16, help="train crops whose activations are fitted")
    return show_every_default(parser)


def check_block_flags(parser, args) -> None:
    """The NPU blocks' rules (and ``--init_from_gdn``'s), as one-line argparse errors naming the flag.

    Without a residual a block must start as the identity some other way: the
    encoder carries +x and -x through its ReLU6 on 2C hidden channels (so
    ``--enc_t`` >= 2), the decoder's gain must be able to equal 1
    (``--dec_gmin`` < 1 < ``--dec_gmax``).
    """
    if args.enc_t <= 0:
        parser.error(f"--enc_t must be > 0, got {args.enc_t:g}")
    if not args.enc_residual and args.enc_t < 2:
        parser.error(f"--enc_t must be >= 2 with --enc_residual false (identity init carries +x and -x on 2C "
                     f"channels), got {args.enc_t:g}")
    for flag in ("enc_kdw", "dec_k"):
        value = getattr(args, flag)
        if value < 1 or value % 2 == 0:
            parser.error(f"--{flag} must be a positive odd kernel size (1, 3, 5, ...), got {value}")
    if args.dec_gmin < 0 or args.dec_gmin >= args.dec_gmax:
        parser.error(f"--dec_gmin must be >= 0 and < --dec_gmax, got [{args.dec_gmin:g}, {args.dec_gmax:g}]")
    if not args.dec_residual and not args.dec_gmin < 1 < args.dec_gmax:
        parser.error(f"--dec_residual false needs --dec_gmin < 1 < --dec_gmax (identity init needs gain 1), "
                     f"got [{args.dec_gmin:g}, {args.dec_gmax:g}]")
    for flag in ("gdn_fit_steps", "gdn_fit_images"):
        value = getattr(args, flag)
        if value < 0 or (args.init_from_gdn and value < 1):
            parser.error(f"--{flag} must be >= 1 with --init_from_gdn true (and never negative), got {value}")


def block_kwargs(args):
    """(enc_kwargs, dec_kwargs) for ``replace_gdn_with_npu`` (src/replace_gdn_npu.py) from the NPU flags."""
    enc = {"t": args.enc_t, "k_dw": args.enc_kdw, "use_eca": args.enc_eca, "residual": args.enc_residual}
    dec = {"k": args.dec_k, "g_min": args.dec_gmin, "g_max": args.dec_gmax, "residual": args.dec_residual}
    return enc, dec


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
    return run_training(args, replace, enc_kwargs, dec_kwargs)


if __name__ == "__main__":
    run_cli(main)
