"""The training engine behind ``src/train_finetune_relu.py`` and ``train_finetune_npu.py``.

A script builds its parser with ``src.train_args.get_args_parser`` (adding its own flags) and
calls ``run_training(args, replace, enc_kwargs, dec_kwargs)``; everything else
-- data, model, precision, optimisation, checkpoints, recon output, logging --
lives here, once, one concern per module:

- ``run``: ``run_training``, validate -> build -> resume -> epochs -> summary;
- ``setup``: the only module that reads the flags: builds the objects and the frozen configs below;
- ``trainer``: what a step is built from (``Trainer``, ``StepConfig``);
- ``step``: one optimizer step and the ranks' agreement;
- ``loop``: the epochs, log windows, validation, recon dumps (``LoopConfig``);
- ``state``: checkpoint payload, resume, extending, best selections, output folders (``TrainState``, ``OutputConfig``).

The step reads as the recipe says it: forward under autocast, loss in FP32,
backward, unscale + clip, step, aux step.
"""

from src.checkpoint import unwrap
from src.engine import loop, run, setup, state, step
from src.engine.loop import LoopConfig, evaluate, train_one_epoch, weights_checksum
from src.engine.run import run_training
from src.engine.setup import AUX_LR, GdnFit, build_trainer, create_model, prepare_model, seed_everything
from src.replace_gdn import split_aux_parameters
from src.engine.state import OutputConfig, TrainState, checkpoint_payload
from src.engine.step import (StepVerdict, TrainingStopped, agree_on_step, last_good_checkpoint, step_optimizers,
                             training_step)
from src.engine.trainer import StepConfig, Trainer

__all__ = [
    "AUX_LR", "GdnFit", "LoopConfig", "OutputConfig", "StepConfig", "StepVerdict", "TrainState", "Trainer",
    "TrainingStopped", "agree_on_step", "build_trainer", "checkpoint_payload", "create_model", "evaluate",
    "last_good_checkpoint", "loop", "prepare_model", "run", "run_training", "seed_everything", "setup",
    "split_aux_parameters", "state", "step", "step_optimizers", "train_one_epoch", "training_step", "unwrap",
    "weights_checksum",
]
