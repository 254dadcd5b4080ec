"""The shipped codec: a bundle of two ONNX graphs and the entropy tables, its file format, its runtimes.

- ``format``: the file (header + CompressAI's rANS payload);
- ``tables``: the factorized prior's tables and the range coder;
- ``runtimes``: onnxruntime / OpenVINO, and what each executes in which precision;
- ``bundle``: reading a bundle and coding with it (``Codec``);
- ``build``: writing a bundle from a model (export, INT8, verification, audit);
- ``subpixel``: the decoder's ConvTranspose as Conv + DepthToSpace;
- ``latents``: the check that a latent can be range-coded;
- ``roundtrip``: the bitstream round trip that eval, the demo and PTQ share.

Nothing here is re-exported (``import src.codec.latents`` must not load a
runtime): import the module that holds what you need.
"""
