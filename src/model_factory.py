"""One place that turns an architecture description into a model.

The description is a plain dict (it is stored in every checkpoint, and
``torch.load(weights_only=True)`` reads plain dicts)::

    {"base_model": "bmshj2018-factorized", "quality": 3, "metric": "mse",
     "replace": "none" | "relu" | "npu", "replace_parts": "encoder" | "decoder" | "all" | "none",
     "enc_kwargs": {...}, "dec_kwargs": {...},  # the blocks' options, every default filled in
     "qat": None | src.quant.scheme.qat_scheme(precision, scales)}

``qat`` marks a quantisation-aware model: the same network with fake-quant
in g_a/g_s, whose scales are in the state dict. A checkpoint is read in the
current format whatever its age (``src.checkpoint_format`` upgrades it on
read), so this module knows only today's description.

Training, eval, export and resume all rebuild the exact network from it.
"""

from __future__ import annotations

import argparse
import urllib.error
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from compressai.zoo import image_models
from compressai.zoo.image import model_architectures
from compressai.zoo import load_state_dict as rename_zoo_keys
from torch import nn

from src.checkpoint import read_checkpoint, save_checkpoint, state_and_arch
from src.checkpoint_format import weights_payload
from compressai.layers import GDN

from src.cli import UserError
from src.npu_blocks import GDNishLiteDec, GDNishLiteEnc
from src.quant.fake_quant import prepare_qat
from src.quant.scheme import normalise_scheme
from src.replace_gdn import REPLACE_MODES, find_gdn_layers, replace_gdn_with_relu
from src.replace_gdn_npu import fit_blocks_to_gdn, replace_gdn_with_npu

QUALITIES = range(1, 9)
# Zoo models built from g_a / g_s transforms, where GDN replacement applies.
BASE_MODELS = ("bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean", "mbt2018")
REPLACE_KINDS = ("none", "relu", "npu")
# Buffers CompressAI resizes itself when loading (their shape depends on update()).
_ENTROPY_TABLE_SUFFIXES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def quality_index(text: str) -> int:
    """argparse type of ``--quality``: CompressAI's zoo has qualities 1-8 (the recipe's "0〜8" counts a 0 it lacks)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in QUALITIES:
        raise argparse.ArgumentTypeError(f"CompressAI's qualities are 1-8, got {text}")
    return value


def make_arch(base_model: str = "bmshj2018-factorized", quality: int = 3, metric: str = "mse",
              replace: str = "relu", replace_parts: str = "all", enc_kwargs: Optional[Dict[str, Any]] = None,
              dec_kwargs: Optional[Dict[str, Any]] = None, qat: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Validate and normalise an architecture description (``qat``: None/False, True or a ``qat_scheme()``)."""
    if base_model not in BASE_MODELS:
        raise ValueError(f"base_model must be one of {BASE_MODELS}, got {base_model!r}")
    if quality not in QUALITIES:
        raise ValueError(f"quality must be in 1..8 (CompressAI's quality index), got {quality!r}")
    if replace not in REPLACE_KINDS:
        raise ValueError(f"replace must be one of {REPLACE_KINDS}, got {replace!r}")
    if replace_parts not in REPLACE_MODES:
        raise ValueError(f"replace_parts must be one of {sorted(REPLACE_MODES)}, got {replace_parts!r}")
    if replace == "none" or replace_parts == "none":
        replace, replace_parts = "none", "none"
    qat = normalise_scheme(qat)
    return {
        "base_model": base_model, "quality": int(quality), "metric": metric,
        "replace": replace, "replace_parts": replace_parts,
        "enc_kwargs": GDNishLiteEnc.options(enc_kwargs) if replace == "npu" else {},
        "dec_kwargs": GDNishLiteDec.options(dec_kwargs) if replace == "npu" else {},
        "qat": qat,
    }


def base_network(arch: Mapping[str, Any]) -> nn.Module:
    """The unmodified (GDN) CompressAI network of ``arch``, randomly initialised."""
    return image_models[arch["base_model"]](quality=arch["quality"], metric=arch["metric"], pretrained=False)


def gdn_model(base_model: str = "bmshj2018-factorized", quality: int = 3, metric: str = "mse") -> nn.Module:
    """The GDN CompressAI network, randomly initialised: what a training script's ``build_model`` starts from."""
    return base_network(make_arch(base_model, quality, metric, replace="none"))


def apply_replacement(model: nn.Module, arch: Mapping[str, Any]) -> nn.Module:
    if arch["replace"] == "relu":
        return replace_gdn_with_relu(model, arch["replace_parts"])
    if arch["replace"] == "npu":
        return replace_gdn_with_npu(model, arch["replace_parts"], arch["enc_kwargs"], arch["dec_kwargs"])
    return model


def apply_qat(model: nn.Module, arch: Mapping[str, Any]) -> nn.Module:
    """Fake-quant in g_a/g_s for a QAT ``arch`` (src/quant/qat.py); other models are returned as they are."""
    return prepare_qat(model, arch["qat"]) if arch.get("qat") else model


def build_model(arch: Mapping[str, Any]) -> nn.Module:
    """The network that ``arch`` describes, with random weights (load them next)."""
    arch = make_arch(**arch)
    return apply_qat(apply_replacement(base_network(arch), arch), arch)


def _kind_at(module: nn.Module) -> str:
    if isinstance(module, GDN):
        return "none"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, (GDNishLiteEnc, GDNishLiteDec)):
        return "npu"
    return type(module).__name__


def _options(module: nn.Module) -> Dict[str, Any]:
    """A module's plain settings (kernel sizes, gain range, residual, ...), not its weights."""
    plain = (bool, int, float, str, tuple, type(None))
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and isinstance(v, plain)}


def structure_difference(model: nn.Module, other: nn.Module) -> Optional[str]:
    """The first place where two networks differ in a module's type, settings or parameter shapes; None if nowhere."""
    mine, theirs = dict(model.named_modules()), dict(other.named_modules())
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if a is None or b is None or type(a) is not type(b):
            return f"'{name}' is {type(a).__name__ if a is not None else 'absent'} against " \
                   f"{type(b).__name__ if b is not None else 'absent'}"
        if name and _options(a) != _options(b):
            diff = sorted(k for k in set(_options(a)) | set(_options(b)) if _options(a).get(k) != _options(b).get(k))
            return f"'{name}' differs in {', '.join(diff)}"
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith(_ENTROPY_TABLE_SUFFIXES)}
              for m in (model, other)]
    if shapes[0] != shapes[1]:
        key = next(k for k in sorted(set(shapes[0]) | set(shapes[1])) if shapes[0].get(k) != shapes[1].get(k))
        return f"parameter '{key}' has shape {shapes[0].get(key)} against {shapes[1].get(key)}"
    return None


def describe_model(model: nn.Module, base_model: str = "bmshj2018-factorized", quality: int = 3,
                   metric: str = "mse", qat: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The architecture description of a (float) network, read off its modules, then checked by rebuilding it.

    Where the GDN network of ``base_model``/``quality`` holds GDN/IGDN, ``model``
    holds GDN (none), ``nn.ReLU`` (relu) or GDNishLite blocks (npu); the swapped
    transforms give ``replace_parts``, and the blocks' options are those
    ``replace_gdn_with_npu`` recorded (``model.npu_block_kwargs``). The
    description is kept only if ``build_model`` of it gives the very same
    network (types, settings, shapes): what it cannot express (two kinds, half a
    transform, hand-made blocks with other options) is a ValueError saying where.
    """
    positions = find_gdn_layers(gdn_model(base_model, quality, metric))
    kinds: Dict[str, set] = {"g_a": set(), "g_s": set()}
    for path, _ in positions:
        kinds[path.split(".")[0]].add(_kind_at(model.get_submodule(path)))
    unknown = sorted(k for ks in kinds.values() for k in ks if k not in REPLACE_KINDS)
    if unknown:
        raise ValueError(f"a GDN position holds {unknown[0]}: the architecture description knows GDN, ReLU and "
                         "GDNishLite blocks only")
    for transform, found in kinds.items():
        if len(found) > 1:
            raise ValueError(f"{transform} mixes {' and '.join(sorted(found))}: a transform is swapped whole "
                             "or not at all")
    swapped = {t: next(iter(k)) for t, k in kinds.items() if k and k != {"none"}}
    if len(set(swapped.values())) > 1:
        raise ValueError(f"g_a holds {swapped['g_a']} and g_s {swapped['g_s']}: one replacement kind per model")
    parts = {("g_a",): "encoder", ("g_s",): "decoder", ("g_a", "g_s"): "all", (): "none"}[tuple(sorted(swapped))]
    replace = next(iter(swapped.values()), "none")
    recorded = getattr(model, "npu_block_kwargs", {})
    block_kwargs = {}
    for cls, key in ((GDNishLiteEnc, "enc_kwargs"), (GDNishLiteDec, "dec_kwargs")):
        options = [recorded.get(path, {}) for path, _ in positions if isinstance(model.get_submodule(path), cls)]
        block_kwargs[key] = options[0] if options else {}
        if any(o != options[0] for o in options):
            raise ValueError(f"the {cls.__name__} blocks were made with different options: {options}")
    arch = make_arch(base_model, quality, metric, replace, parts, qat=qat, **block_kwargs)
    difference = structure_difference(model, build_model(dict(arch, qat=None)))
    if difference:
        raise ValueError(f"the network does not match what its description ({replace}/{parts}) rebuilds: {difference}")
    return arch


def download_pretrained_state(arch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """CompressAI's published weights of the GDN base of ``arch`` (cached by torch.hub)."""
    try:
        model = image_models[arch["base_model"]](quality=arch["quality"], metric=arch["metric"], pretrained=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"could not download CompressAI's pretrained {arch['base_model']} q={arch['quality']} weights "
            f"({reason}); pass --base_checkpoint PATH (a copy of the zoo .pth.tar) or --pretrained false"
        ) from None
    except RuntimeError as err:
        raise UserError(f"CompressAI has no pretrained {arch['base_model']} q={arch['quality']} "
                        f"metric={arch['metric']}: {err}") from None
    return model.state_dict()


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a UserError listing every key that does not fit ``model`` (no silent partial load)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(
        k for k in set(own) & set(state_dict)
        if not k.endswith(_ENTROPY_TABLE_SUFFIXES) and tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise UserError(f"weights in {source} do not fit the architecture ({'; '.join(problems)})")


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Strictly load ``state_dict`` (CompressAI resizes the entropy-coder tables itself)."""
    check_state_dict(model, state_dict, source)
    model.load_state_dict(dict(state_dict))
    return model


def model_from_checkpoint(state: Mapping[str, torch.Tensor], arch: Optional[Mapping[str, Any]],
                          source: str):
    """(model, arch) of a checkpoint of this project, rebuilt from its architecture description alone."""
    if arch is None:
        raise UserError(f"{source} has no architecture description: not a checkpoint of this project")
    try:
        arch = make_arch(**arch)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: unusable architecture description ({err})") from None
    return load_weights(build_model(arch), state, source), arch


def load_checkpoint_model(path: Path) -> Tuple[nn.Module, Optional[Dict[str, Any]], Dict[str, Any]]:
    """(model, arch, payload) of a checkpoint file: the one path from a file to a model (eval, export, benches).

    A checkpoint of this project is rebuilt from its architecture description
    (arch). A plain CompressAI state dict (a zoo ``.pth.tar``, arch None) holds
    the GDN base the recipe starts from, ``bmshj2018-factorized``; its N and M
    are read from the weights by CompressAI's ``from_state_dict``.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    state, arch = state_and_arch(payload, path)
    if arch is None:
        try:
            model = model_architectures["bmshj2018-factorized"].from_state_dict(rename_zoo_keys(dict(state)))
        except (KeyError, RuntimeError) as err:
            raise UserError(f"{path} is neither a checkpoint of this project (no architecture description) nor a "
                            f"CompressAI bmshj2018-factorized state dict ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:80]})") from None
        return model, None, payload
    model, arch = model_from_checkpoint(state, arch, str(path))
    return model, arch, payload


def model_from_base_weights(arch: Mapping[str, Any], base_state: Optional[Mapping[str, torch.Tensor]],
                            base_arch: Optional[Mapping[str, Any]], source: str) -> nn.Module:
    """Build ``arch`` starting from weights of either its GDN base or ``arch`` itself.

    ``base_arch`` is the description stored with the weights (None for a plain
    zoo state dict, which is a GDN base). GDN weights are loaded before the
    swap, so every untouched layer keeps them; weights of the very same
    architecture are loaded after it (e.g. continuing a ReLU fine-tune). A QAT
    run may also start from the float model of its architecture (the usual
    order: fine-tune in float, then QAT): its weights load, then fake-quant goes in.
    """
    arch = make_arch(**arch)
    if base_state is None:
        return build_model(arch)
    base_arch = make_arch(**base_arch) if base_arch is not None else None
    if base_arch is None or base_arch["replace"] == "none":
        if arch["qat"]:
            raise UserError(f"{source} is {'a GDN' if base_arch else 'a zoo'} model: QAT is a phase after float "
                            f"training; start --qat true from a float checkpoint of this architecture "
                            f"({arch['replace']}/{arch['replace_parts']})")
        base = base_network(arch)
        base = load_weights(base, base_state if base_arch else rename_zoo_keys(dict(base_state)), source)
        return apply_qat(apply_replacement(base, arch), arch)
    if base_arch == arch:
        return load_weights(build_model(arch), base_state, source)
    if arch["qat"] and base_arch == dict(arch, qat=None):
        return apply_qat(load_weights(build_model(base_arch), base_state, source), arch)
    if base_arch["qat"] and not arch["qat"]:
        raise UserError(f"{source} is a QAT checkpoint; continue it with --qat true (or start from its float base)")
    raise UserError(f"{source} holds a {base_arch['replace']}/{base_arch['replace_parts']} model; it can start "
                    f"a run of that same architecture or a GDN base, not {arch['replace']}/{arch['replace_parts']}")


def swapped_checkpoint(base: Path, replace: str, parts: str, out: Path,
                       fit_images: Optional[torch.Tensor] = None) -> Path:
    """The GDN ``base`` with GDN swapped and not fine-tuned, saved as a checkpoint (the 'right after the swap' point).

    With ``fit_images`` the new blocks are first fitted to the GDN layers on
    those crops, as ``--init_from_gdn true`` does (300 steps per block).
    """
    state, base_arch = state_and_arch(read_checkpoint(base), Path(base))
    arch = make_arch(**dict(base_arch or make_arch(), replace=replace, replace_parts=parts))
    model = model_from_base_weights(arch, state, base_arch, str(base))
    if fit_images is not None:
        gdn = model_from_base_weights(dict(arch, replace="none"), state, base_arch, str(base))
        fit_blocks_to_gdn(gdn, model, fit_images, steps=300)
    model.update(force=True)
    save_checkpoint(weights_payload(model.state_dict(), arch), out)
    return out
