"""Decoding uploaded images and masks in the ingress, before any model work.

Every way an upload can be wrong (empty, not an image, truncated, an unsupported format,
a decompression bomb) becomes a 400 naming the field; nothing here can raise anything else
or hang a replica.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.service.errors import InvalidRequestError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")  # in the order the OpenAPI document lists them
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass(frozen=True)
class BytesUpload:
    """Bytes already read (a gRPC artifact, a job's upload) as the images service reads an
    upload: with an async ``read``."""

    data: bytes
    content_type: str = "application/octet-stream"

    async def read(self) -> bytes:
        return self.data


def _open(data: bytes, param: str, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidRequestError(f"'{param}' is empty.", param=param)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past twice the limit, raises) on huge images: both are errors.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise InvalidRequestError(
                    f"'{param}' is a {image.format} image; send PNG, JPEG or WebP.", param=param
                )
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequestError(
                    f"'{param}' is {width}x{height} = {width * height} pixels; "
                    f"the most this server decodes is {max_pixels}.",
                    param=param,
                )
            image.load()
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequestError(
            f"'{param}' is too large to decode (over {max_pixels} pixels).", param=param
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequestError(
            f"'{param}' is not an image Pillow can read; send PNG, JPEG or WebP.", param=param
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequestError(
            f"'{param}' could not be decoded ({type(exc).__name__}: the file may be truncated "
            "or corrupt).",
            param=param,
        ) from None
    # Photos carry their rotation in EXIF; apply it so width and height mean what they show.
    return ImageOps.exif_transpose(image)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float modes to 8 bits (Pillow's convert would clip)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "I" or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if array.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def decode_image(data: bytes, param: str, max_pixels: int) -> np.ndarray:
    """Decode an upload into RGB uint8 (H, W, 3).

    Any mode is accepted: palette, grayscale, CMYK and 16-bit images are converted, and
    transparent pixels are composited over white.
    """
    image = _to_8bit(_open(data, param, max_pixels))
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_mask(data: bytes, param: str, max_pixels: int) -> np.ndarray:
    """Decode a mask into repaint weights, uint8 (H, W): 255 repaints, 0 keeps.

    As OpenAI defines it, transparent pixels mark the area to edit (weight 255 - alpha).
    A mask without an alpha channel is read as diffusers reads one: white repaints.
    """
    image = _to_8bit(_open(data, param, max_pixels))
    if _has_alpha(image):
        alpha = np.asarray(image.convert("RGBA"), dtype=np.uint8)[:, :, 3]
        weights = 255 - alpha
        if not weights.any():
            raise InvalidRequestError(
                f"'{param}' has no transparent pixels, so there is nothing to edit.", param=param
            )
        return weights
    return np.asarray(image.convert("L"), dtype=np.uint8)


def decode_keep_mask(data: bytes, param: str, max_pixels: int) -> np.ndarray:
    """Decode a mask in Stability's convention into repaint weights, uint8 (H, W): its
    gray level is what to keep (0, black: change; 255, white: keep), as its SDK documents
    for an ARTIFACT_MASK; an alpha channel is not read."""
    image = _to_8bit(_open(data, param, max_pixels))
    weights = 255 - np.asarray(image.convert("L"), dtype=np.uint8)
    if not weights.any():
        raise InvalidRequestError(
            f"'{param}' is white everywhere, so there is nothing to change (black marks "
            "what to change, white what to keep).", param=param)
    return weights


def resize(pixels: np.ndarray, width: int, height: int, resample=Image.Resampling.LANCZOS) -> np.ndarray:
    """Resize (H, W, C) or (H, W) uint8 pixels; a no-op when the size already matches."""
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((width, height), resample), dtype=np.uint8)
