"""Encoding model output (uint8 arrays) into the bytes a client asked for.

This runs in the ingress, on CPU, so GPU replicas are free for the next batch as soon as
they return pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(
    pixels: np.ndarray, output_format: str, compression: int | None = None, png_level: int = 6,
    png_encoder: str = "fpng",
) -> bytes:
    """Encode one (H, W, 3) uint8 image.

    ``compression`` is OpenAI's ``output_compression`` (0-100) and becomes the jpeg/webp
    quality; it defaults to 100 as OpenAI's does. PNG goes through fpng (a 1024x1024 photo
    in about 3 ms here, 25x faster than zlib at level 1 and files of the same size) unless
    ``png_encoder`` is "zlib": Pillow at ``png_level``, smallest files at 6 and up.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    if output_format == "png" and png_encoder == "fpng":
        import fpng

        return fpng.from_ndarray(np.ascontiguousarray(pixels))
    image = Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=png_level)
    else:
        quality = 100 if compression is None else compression
        image.save(buffer, format=_PIL_FORMATS[output_format], quality=quality)
    return buffer.getvalue()
