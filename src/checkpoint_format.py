"""The checkpoint payload's format: its version, the formats this project wrote before, and one upgrade step each.

Every checkpoint is a plain dict (read with ``torch.load(weights_only=True)``)
holding ``"format_version": FORMAT_VERSION``. ``upgrade_payload`` is applied to
every project checkpoint on read (``src.checkpoint.read_checkpoint``), so
eval, export, ``--resume`` and ``--base_checkpoint`` all see the current
format and nothing else reads a version. A version newer than this code is
refused in one line.

The format (version 5)::

    state_dict, arch                  the weights and their architecture description (src.model_factory)
    format_version                    5
    a training checkpoint also holds:
    args                              the flags exactly as given (vars of the parsed flags), nothing derived
    data_fingerprint                  the data the run trained on (src.data.data_fingerprint), for --resume
    amp_dtype                         the AMP dtype the run ran ("auto" resolved), for --resume
    optimizer, aux_optimizer, scheduler, scaler, epoch, step, epoch_step, best_msssim, best_loss,
    epochs_total, world_size, rng, rng_per_rank

The formats before it carried no version; ``legacy_version`` tells them
apart by what they hold (the one place that does). tests/fixtures/ keeps a
checkpoint of each, written by the code of its time, but of format 1 (two
hours on Nov 29; what sets it apart from 2, an architecture without "qat", the
format-0 fixture has too):

    0  Nov 29, 6022726 .. 9dce377^   the first engine: some of epoch_step, best_loss, epochs_total, world_size,
                                     rng_per_rank missing
    1  9dce377 .. 03582e2^           all training keys; the architecture has no "qat"
    2  03582e2 .. 688878c^           "qat" None, or the first QAT (torch.ao observers; cannot be upgraded)
    3  688878c .. 9c4be4e^           QAT's learned scales were parameters stepped as themselves
    4  9c4be4e .. this format        learned scales in log space; "args" also held the derived
                                     amp_dtype_resolved and data_fingerprint

A float checkpoint reads as the oldest format its contents fit (2 from the
first QAT on): the later steps find nothing of theirs in it and leave it as it is.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Tuple

import torch

from src.cli import UserError

FORMAT_VERSION = 5
# What a training checkpoint of this format holds beside the weights (--resume checks them all before reading any).
TRAINING_KEYS = ("args", "arch", "epoch", "step", "optimizer", "scheduler", "scaler", "best_msssim", "rng",
                 "epoch_step", "best_loss", "epochs_total", "world_size", "rng_per_rank", "data_fingerprint",
                 "amp_dtype")
# Keys the first engine's training checkpoints may lack (added on Nov 29 in 50d8730, e8a22ae, a34ffe4, 9dce377).
FIRST_DAY_KEYS = ("epoch_step", "best_loss", "epochs_total", "world_size", "rng_per_rank")
# LearnedFakeQuantize's scale = exp(LOG_SCALE_GAIN * log_scale) since format 4 (src/quant/scheme.py holds the same
# number: changing it there is a new format).
LOG_SCALE_GAIN = 30.0
# What format 4 writes as a QAT scheme's "learned_scales" (src.quant.scheme.qat_scheme).
LOG_SPACE_SCALES = f"log space, relative step ~{LOG_SCALE_GAIN:g} x lr"
# torch.ao's _LearnableFakeQuantize state beside its scale: its flags, eps and an idle observer (format 3).
ABSOLUTE_STEP_EXTRAS = ("static_enabled", "learning_enabled", "eps", "activation_post_process")
ABSOLUTE_STEP_NOT_RESUMABLE = ("is a QAT run whose learned scales were stepped as themselves (before log-space "
                               "scales): its optimizer state does not carry over; export it as it is, or run the "
                               "QAT phase again from its float checkpoint (--base_checkpoint)")

Payload = Dict[str, Any]


def is_project_payload(payload: Mapping[str, Any]) -> bool:
    """A checkpoint of this project (weights with their architecture), not a plain or foreign state dict."""
    return "state_dict" in payload and "arch" in payload


def is_training_payload(payload: Mapping[str, Any]) -> bool:
    """Written by the training engine (it can be resumed), not a weights-only checkpoint (the demo's swaps)."""
    return "optimizer" in payload and isinstance(payload.get("args"), Mapping)


def weights_payload(state_dict: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> Payload:
    """A checkpoint of weights alone (no training state), in the current format: the demo's and the swap's."""
    return {"format_version": FORMAT_VERSION, "state_dict": dict(state_dict), "arch": dict(arch)}


def legacy_version(payload: Mapping[str, Any]) -> int:
    """The format of a checkpoint written before formats had a version, read off what it holds."""
    if is_training_payload(payload) and not all(key in payload for key in FIRST_DAY_KEYS):
        return 0
    arch = payload["arch"] if isinstance(payload["arch"], Mapping) else {}
    if "qat" not in arch:
        return 1
    qat = arch["qat"]
    if not isinstance(qat, Mapping) or "precision" not in qat:
        return 2
    return 3 if "learned_scales" not in qat else 4


# ---------------------------------------------------------------- the upgrade steps, one per format change

def first_engine_to_1(payload: Payload, source: str) -> Payload:
    """0 -> 1: the training keys the first engine did not write, as the engine then assumed them.

    No mid-epoch position (it saved at epoch ends), no best val loss yet, the
    planned length is ``--epochs``, one process, its one RNG state.
    """
    if is_training_payload(payload):
        payload.setdefault("epoch_step", 0)
        payload.setdefault("best_loss", math.inf)
        payload.setdefault("epochs_total", payload["args"].get("epochs", payload.get("epoch", 0)))
        payload.setdefault("world_size", 1)
        if "rng" in payload:
            payload.setdefault("rng_per_rank", [payload["rng"]])
    return payload


def without_qat_to_2(payload: Payload, source: str) -> Payload:
    """1 -> 2: the architecture says it is not a QAT model (QAT came in with 03582e2)."""
    if isinstance(payload["arch"], dict):
        payload["arch"].setdefault("qat", None)
    return payload


def observer_qat_to_3(payload: Payload, source: str) -> Payload:
    """2 -> 3: a float checkpoint is unchanged; the first QAT's (torch.ao observers, rounding placed where the
    graph does not round) has no counterpart in the QAT that replaced it, so it is refused."""
    qat = payload["arch"].get("qat") if isinstance(payload["arch"], Mapping) else None
    if qat:
        raise UserError(f"{source} is a QAT checkpoint of the first QAT scheme (torch.ao observers, before Dec 1): "
                        "its scales do not carry over to today's QAT; run the QAT phase again from its float "
                        "checkpoint (--qat true --base_checkpoint FLOAT.pt)")
    return payload


def absolute_step_scales_to_4(payload: Payload, source: str) -> Payload:
    """3 -> 4: each learned scale (torch.ao's ``_LearnableFakeQuantize``: the scale itself and an idle observer)
    becomes LearnedFakeQuantize's ``log_scale``, so the model evaluates and exports as it did; its resume is
    refused, as its optimizer state belongs to the scales themselves (frozen scales were buffers then as now)."""
    qat = payload["arch"].get("qat") if isinstance(payload["arch"], Mapping) else None
    if not qat:
        return payload
    state = dict(payload["state_dict"])
    learned = [key[: -len("learning_enabled")] for key in state if key.endswith(".learning_enabled")]
    for owner in learned:
        state[owner + "log_scale"] = torch.log(state.pop(owner + "scale").float().reshape(1)) / LOG_SCALE_GAIN
        for key in [k for k in state if k.startswith(owner) and k[len(owner):].split(".")[0] in ABSOLUTE_STEP_EXTRAS]:
            del state[key]
    payload["state_dict"] = state
    payload["arch"] = dict(payload["arch"], qat={**qat, "learned_scales": LOG_SPACE_SCALES})
    if qat.get("scales") == "learned" and is_training_payload(payload):
        payload["not_resumable"] = ABSOLUTE_STEP_NOT_RESUMABLE
    return payload


def derived_args_to_5(payload: Payload, source: str) -> Payload:
    """4 -> 5: the values setup derived and wrote into the flags move to fields of their own; "args" keeps the
    flags as given. Checkpoints from before either existed get None (resume then does not compare them)."""
    if is_training_payload(payload):
        args = dict(payload["args"])
        payload["data_fingerprint"] = args.pop("data_fingerprint", None)
        payload["amp_dtype"] = args.pop("amp_dtype_resolved", None)
        payload["args"] = args
    return payload


UPGRADES: Tuple[Callable[[Payload, str], Payload], ...] = (
    first_engine_to_1, without_qat_to_2, observer_qat_to_3, absolute_step_scales_to_4, derived_args_to_5)


def payload_version(payload: Mapping[str, Any], source: str) -> int:
    """The payload's format; one line when it is newer than this code or not a version at all."""
    if "format_version" not in payload:
        return legacy_version(payload)
    version = payload["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise UserError(f"{source} has an unreadable checkpoint format version ({version!r})")
    if version > FORMAT_VERSION:
        raise UserError(f"{source} is in checkpoint format {version}, newer than this code reads (up to "
                        f"{FORMAT_VERSION}): update the code to read it")
    return version


def upgrade_payload(payload: Payload, source: str) -> Payload:
    """``payload`` in the current format, each step from its own format on applied in order.

    Plain state dicts (a zoo ``.pth.tar``) and foreign payloads pass as they are.
    """
    if not is_project_payload(payload):
        return payload
    version = payload_version(payload, source)
    for step in UPGRADES[version:]:
        payload = step(payload, source)
    payload["format_version"] = FORMAT_VERSION
    return payload
