"""NPU targets: the project's codec compiled by each NPU vendor's own toolchain, and measured there.

Vendor toolchains pin old numpy / onnx / tensorflow / torch, so each lives in a venv of its own
(``targets/<toolchain>/requirements.txt`` -> ``.venv-<toolchain>/``) and is driven through one process
boundary: a JSON job in, artefacts and a ``report.json`` out (``targets/<toolchain>/worker.py``; the protocol
is in ``docs/npu_targets.md``). This package is the project side of that boundary:

- ``registry``   which targets exist, which toolchain compiles each, which precisions it takes;
- ``toolchains`` the toolchain venvs (created from their pinned requirements) and the worker call;
- ``rewrites``   exact float rewrites of the decoder's upsampling that the converters can place;
- ``jobs``       the symbol-interface graphs, calibration and eval arrays of one model, written as jobs;
- ``roundtrip``  the codec's round trip through a target's quantised model, with real bits;
- ``report``     the per-target JSON and Markdown.

``scripts.npu_targets`` is the command line.
"""
