"""Quantisation: PTQ and QAT of the codec's transforms to INT8, and the ONNX graphs they are written as.

Two sides, so that building, training and evaluating a model never loads onnx or onnxruntime:

- torch only (the model core may import these): ``scheme`` (the flag
  values, PTQ profiles and the QAT scheme dict, as plain values),
  ``fake_quant`` (QAT's fake-quant modules, where they sit, ``prepare_qat``,
  reading older QAT state dicts), ``symbols`` (the symbol interface as
  PyTorch modules, written to ONNX by ``torch.onnx``);
- onnx / onnxruntime: ``ranges`` (calibration histograms and each
  activation's range), ``ptq`` (onnxruntime's ``quantize_static`` with
  the profiles, the INT8 pair, its round trip and sensitivity), ``qat``
  (QAT's calibration from PTQ and its QDQ export), ``onnx_export`` (the
  float graphs, their checks, and ``scripts.export_onnx``'s INT8 report).

Nothing here is re-exported: import the module that holds what you need.
"""
