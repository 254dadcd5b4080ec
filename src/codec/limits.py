"""The largest image the tools code, checked before any pixel is decoded or any graph runs.

Why a limit and not tiles: the NPU encoder's blocks pool over the whole image
(``GlobalAveragePool`` in its graph), so a tiled encoder cannot give the
untiled symbols; and peak memory grows with the pixels: with the q1 bundle on
onnxruntime, about 0.8 GB per megapixel to encode and 1.1 GB to decode, over
~1 GB of libraries (measured, docs/codec.md 'Limits'): 7.6 GB to encode at
the limit, about 10 GB to decode, what a 16 GB machine still runs.
The codec (``src.codec``), ``src.eval`` and ``scripts.export_onnx --input_size``
share it.
"""

MAX_PIXELS = 1 << 23
"""8 388 608 pixels after padding to a multiple of 64 (e.g. 4096 x 2048, or 2880 x 2880)."""
PAD_MULTIPLE = 64


def padded_pixels(height: int, width: int, multiple: int = PAD_MULTIPLE) -> int:
    """Pixels of a ``height`` x ``width`` image once zero-padded to a multiple of ``multiple`` on each side."""
    return -(-height // multiple) * multiple * (-(-width // multiple) * multiple)
