"""Swap GDN for ``GDNishLiteEnc`` and IGDN for ``GDNishLiteDec`` (NPU-friendly blocks)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from compressai.layers import GDN
from torch import nn

from src.npu_blocks import GDNishLiteDec, GDNishLiteEnc
from src.replace_gdn import replace_gdn


def gdn_channels(gdn: GDN) -> int:
    """GDN stores one beta per channel."""
    return int(gdn.beta.numel())


def replace_gdn_with_npu(model: nn.Module, mode: str = "all", enc_kwargs: Optional[Dict[str, Any]] = None,
                         dec_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """GDN -> GDNishLiteEnc, IGDN -> GDNishLiteDec, channels read from each replaced layer.

    Whether a layer is GDN or IGDN is read from ``gdn.inverse``, not from the
    transform it sits in.
    """
    enc_kwargs, dec_kwargs = dict(enc_kwargs or {}), dict(dec_kwargs or {})

    def make_block(gdn: GDN) -> nn.Module:
        if gdn.inverse:
            return GDNishLiteDec(gdn_channels(gdn), **dec_kwargs)
        return GDNishLiteEnc(gdn_channels(gdn), **enc_kwargs)

    return replace_gdn(model, mode, make_block)
