"""Is a latent fit for the entropy coder? One check, before any range coder sees it.

A diverged model (NaN weights, or weights so large that its latents are
absurd) must be refused with one line, not handed to CompressAI's range coder,
which never returns on such input (see ``LATENT_LIMIT``). Every path that codes
a latent calls ``check_codable`` first: ``src.eval`` (and so the demo) through
``codable_latents``, the training run before it saves a checkpoint, the ONNX
codec and the export round trip.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Union

import numpy as np
import torch
from torch import nn

from src.cli import UserError

LATENT_LIMIT = 2 ** 20
"""The largest |latent| a codec may hand to the range coder.

Why a bound at all: CompressAI's ``BufferedRansEncoder::encode_with_indexes``
(``compressai/cpp_exts/rans/rans_interface.cpp``) codes a symbol outside its
CDF table in bypass mode: ``raw_val = 2 * |value - offset|`` (a ``uint32_t``)
is written in 4-bit chunks, counted by
``while ((raw_val >> (n_bypass * bypass_precision)) != 0) ++n_bypass;``.
Below 2^27 that takes at most 7 chunks (a few bytes more per symbol). From
|value| = 2^27 on, raw_val has bits in its top nibble, the shift count reaches
32, which C++ leaves undefined and x86 takes modulo 32, so the loop never sees
zero: the coder spins forever (measured here with compressai 1.2.8: one symbol
of 1.3e8 codes in 0.5 ms, one of 1.4e8 or NaN, which ``int()`` turns into
INT32_MIN, does not return within 20 s). NaN and Inf always land there.

Why 2^20: latents of trained models are small (the recipe's q=1 base gives
|y| < 5 on Kodak; CompressAI's zoo models stay in the hundreds), so 2^20 is
more than 1000 times what a sane model produces, and 2^7 times below the 2^27
where the coder breaks, a margin for the entropy model's median and offset
that are subtracted before coding. Anything beyond it comes from diverged weights.
"""


def check_codable(latent: Union[torch.Tensor, np.ndarray], source: str) -> None:
    """Raise a one-line ``UserError`` naming ``source`` when ``latent`` is not codable.

    Not codable: any NaN/Inf value, or any |value| >= ``LATENT_LIMIT``
    (``source`` says what produced the latent: a checkpoint, and the image).
    """
    if isinstance(latent, torch.Tensor):
        values = latent.detach()
        count, nonfinite = values.numel(), int((~torch.isfinite(values)).sum())
        largest = float(values.double().abs().max()) if count and not nonfinite else 0.0  # int32 abs overflows
    else:
        values = np.asarray(latent)
        count, nonfinite = values.size, int((~np.isfinite(values)).sum())
        largest = float(np.abs(values.astype(np.float64)).max()) if count and not nonfinite else 0.0
    if nonfinite:
        raise UserError(f"{source}: {nonfinite} of {count} latent values are NaN/Inf (diverged weights); refused "
                        "before the entropy coder, which would never return")
    if largest >= LATENT_LIMIT:
        raise UserError(f"{source}: latent values reach {largest:.3g}, beyond the {LATENT_LIMIT:.3g} (2^20) that "
                        "codable latents stay under (diverged weights); refused before the entropy coder, "
                        "which cannot code |value| >= 2^27")


@contextmanager
def codable_latents(model: nn.Module, source: str) -> Iterator[None]:
    """Within the block, every latent the model's analysis transforms produce is checked (``check_codable``).

    The transforms whose outputs CompressAI's models entropy-code are ``g_a``
    (y) and, in the hyperprior models, ``h_a`` (z); forward hooks check each
    output as it is made, so ``model.compress`` raises before its coder runs,
    at the cost of no extra forward pass.
    """
    hooks = []

    def check(module, inputs, output):
        check_codable(output, source)

    for name in ("g_a", "h_a"):
        transform = getattr(model, name, None)
        if isinstance(transform, nn.Module):
            hooks.append(transform.register_forward_hook(check))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
