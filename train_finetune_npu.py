"""Fine-tune a CompressAI model after replacing GDN/IGDN with NPU-friendly blocks.

    python train_finetune_npu.py --coco_dir /data/coco224 --quality 3

GDN becomes ``GDNishLiteEnc`` and IGDN ``GDNishLiteDec`` (src/npu_blocks.py):
no division or square root, so the result quantises to INT8.
"""

from __future__ import annotations

from typing import Optional, Sequence

from src.cli import run_cli, str2bool
from src.engine import run_training
from src.train_args import get_args_parser


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
    return parser


def block_kwargs(args):
    """(enc_kwargs, dec_kwargs) for src.replace_gdn_npu from the NPU flags."""
    enc = {"t": args.enc_t, "k_dw": args.enc_kdw, "use_eca": args.enc_eca, "residual": args.enc_residual}
    dec = {"k": args.dec_k, "g_min": args.dec_gmin, "g_max": args.dec_gmax, "residual": args.dec_residual}
    return enc, dec


def main(argv: Optional[Sequence[str]] = None):
    args = get_npu_args_parser().parse_args(argv)
    enc, dec = block_kwargs(args)
    return run_training(args, replace="npu", enc_kwargs=enc, dec_kwargs=dec)


if __name__ == "__main__":
    run_cli(main)
