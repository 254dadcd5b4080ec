"""Training, evaluation and model surgery for the GDN-replacement recipe.

Layout, by concern (dependencies point down this list; ``tests/test_layout.py`` checks it):

- entry points the recipe names: ``train_finetune_relu``, ``eval`` (and the top-level ``train_finetune_npu.py``);
- ``engine/``: the one training loop both scripts call; ``train_args``: their flags;
- ``quant/``: PTQ and QAT (torch-only ``scheme``/``fake_quant``/``symbols``; the onnx/onnxruntime rest);
- ``codec/``: the shipped codec (bundle, file format, runtimes, the shared bitstream round trip);
- model core: ``model_factory`` (architecture description -> model; reads checkpoints into models),
  ``checkpoint`` (the payload on disk), ``checkpoint_format`` (its version and the upgrade of every earlier
  format), ``npu_blocks``, ``replace_gdn``, ``replace_gdn_npu``;
- helpers: ``data``, ``images``, ``losses``, ``precision``, ``schedule``, ``distributed``, ``cli``, ...

``model_factory`` and ``checkpoint`` stay single modules at the top: they are what every entry point
imports, and a package of one module each would add a level without adding a concern.
"""

import warnings

# CompressAI 1.2.8 calls torch.jit.script at import time; newer torch warns on every run.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
