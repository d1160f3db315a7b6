"""Decoding uploaded images and masks in the ingress, before any model work.

Every way an upload can be wrong (empty, not an image, truncated, an unsupported format,
a decompression bomb, larger than the model takes) becomes a 400 naming the field; nothing
here can raise anything else or hang a replica. An image's size is checked from its header
against the model's limits before any pixel is decoded, and no conversion holds a copy of
the whole image in a wider type than the decoded one.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.protocol.errors import InvalidRequestError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")  # in the order the OpenAPI document lists them
# Read as the format they are a kind of: a multi-picture JPEG (the MPO phones and cameras
# save, with a depth map or a preview beside the photo) is its first picture, a JPEG.
_SAME_AS = {"MPO": "JPEG"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Rows converted at a time where a conversion needs wider numbers (16-bit scaling, alpha
# compositing): the temporary arrays stay a few MB whatever the image's size.
_ROWS = 256


@dataclass(frozen=True)
class BytesUpload:
    """Bytes already read (a gRPC artifact, a job's upload) as the images service reads an
    upload: with an async ``read``."""

    data: bytes
    content_type: str = "application/octet-stream"

    async def read(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class UploadRule:
    """What an upload may be, known before it is decoded (serve_app/service/planning.py's
    ``upload_rule`` derives it from the request's model and operation).

    ``max_pixels``: the most pixels decoded at all (``ingress.max_upload_pixels``).
    ``check(width, height)``: the model's and operation's own rule on the image's size, read
    from its header (an upscaler's ``max_input_pixels``, an edit's output limits); raises a
    400. The rules it applies hold for either orientation, so the size before EXIF rotation
    is checked. ``target``: the size the model will take the image at, when known before
    decoding (an edit with a ``size``): a JPEG is then decoded at the smallest of its reduced
    scales (1/2, 1/4, 1/8) that is still at least that size, so a large photo costs what the
    model can use.
    """

    max_pixels: int
    check: Callable[[int, int], None] | None = None
    target: tuple[int, int] | None = None


def _rule(rule: UploadRule | int) -> UploadRule:
    return rule if isinstance(rule, UploadRule) else UploadRule(max_pixels=rule)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an upload's header, without decoding it; None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - decoding it says what is wrong, naming the field
        return None


def _open(data: bytes, param: str, rule: UploadRule | int) -> Image.Image:
    rule = _rule(rule)
    if not data:
        raise InvalidRequestError(f"'{param}' is empty.", param=param)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past twice the limit, raises) on huge images: both are errors.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            kind = _SAME_AS.get(image.format, image.format)
            if kind not in ALLOWED_FORMATS:
                raise InvalidRequestError(
                    f"'{param}' is a {image.format} image; send PNG, JPEG or WebP.", param=param
                )
            width, height = image.size
            if width * height > rule.max_pixels:
                raise InvalidRequestError(
                    f"'{param}' is {width}x{height} = {width * height} pixels; "
                    f"the most this server decodes is {rule.max_pixels}.",
                    param=param,
                )
            if rule.check is not None:
                rule.check(width, height)  # the model's limits, before any pixel is decoded
            if kind == "JPEG" and rule.target is not None:
                image.draft("RGB", _oriented(image, rule.target))
            image.load()
            if kind == "WEBP":
                # Pillow's WebP reader keeps the decoded frame beside the image: a copy lets
                # both go.
                image = image.copy()
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequestError(
            f"'{param}' is too large to decode (over {rule.max_pixels} pixels).", param=param
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
    # Photos carry their rotation in EXIF; apply it so width and height mean what they show
    # (in place: a second copy of the image would double what a decode holds).
    ImageOps.exif_transpose(image, in_place=True)
    return image


def _oriented(image: Image.Image, target: tuple[int, int]) -> tuple[int, int]:
    """``target`` (as shown) in the stored orientation: EXIF orientations 5-8 turn the
    picture by 90 degrees."""
    orientation = image.getexif().get(0x0112, 1)
    return (target[1], target[0]) if orientation in (5, 6, 7, 8) else target


def _scale_rows(array: np.ndarray, top: float) -> np.ndarray:
    """``array`` (2-D, wider than 8 bits) scaled so that ``top`` is 255, rounded, clipped,
    as uint8: a few rows at a time, in float32, never a copy of the whole image in a wider
    type."""
    out = np.empty(array.shape, np.uint8)
    scale = np.float32(255.0 / top)
    for row in range(0, array.shape[0], _ROWS):
        block = np.nan_to_num(array[row:row + _ROWS].astype(np.float32)) * scale + np.float32(0.5)
        out[row:row + _ROWS] = np.clip(block, 0, 255)
    return out


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float modes to 8 bits (Pillow's convert would clip)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return Image.fromarray(_scale_rows(np.asarray(image), 65535.0), "L")
    if image.mode == "I":
        array = np.asarray(image)
        return Image.fromarray(_scale_rows(array, 65535.0 if array.max() > 255 else 255.0), "L")
    if image.mode == "F":
        array = np.asarray(image)
        return Image.fromarray(_scale_rows(array, 1.0 if np.nanmax(array) <= 1.0 else 255.0), "L")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (H, W, 4) uint8 composited over white, as RGB (H, W, 3) uint8, a few rows at
    a time (no whole-image temporaries)."""
    out = np.empty(rgba.shape[:2] + (3,), np.uint8)
    for row in range(0, rgba.shape[0], _ROWS):
        block = rgba[row:row + _ROWS].astype(np.uint16)
        alpha = block[..., 3:4]
        out[row:row + _ROWS] = (block[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
    return out


def decode_image(data: bytes, param: str, rule: UploadRule | int) -> np.ndarray:
    """Decode an upload into RGB uint8 (H, W, 3), checked against ``rule`` (an
    :class:`UploadRule`, or the most pixels decoded) before any pixel is decoded.

    Any mode is accepted: palette, grayscale, CMYK and 16-bit images are converted, and
    transparent pixels are composited over white.
    """
    image = _to_8bit(_open(data, param, rule))
    if _has_alpha(image):
        image = image if image.mode == "RGBA" else image.convert("RGBA")
        rgba = np.asarray(image)
        del image  # Pillow's copy goes before the composite is made
        return _over_white(rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def decode_mask(data: bytes, param: str, rule: UploadRule | int) -> np.ndarray:
    """Decode a mask into repaint weights, uint8 (H, W): 255 repaints, 0 keeps.

    As OpenAI defines it, transparent pixels mark the area to edit (weight 255 - alpha).
    A mask without an alpha channel is read as diffusers reads one: white repaints.
    """
    image = _to_8bit(_open(data, param, rule))
    if _has_alpha(image):
        alpha = np.asarray(image.getchannel("A") if image.mode in ("RGBA", "LA") else
                           image.convert("RGBA").getchannel("A"), dtype=np.uint8)
        weights = 255 - alpha
        if not weights.any():
            raise InvalidRequestError(
                f"'{param}' has no transparent pixels, so there is nothing to edit.", param=param
            )
        return weights
    return np.asarray(image.convert("L"), dtype=np.uint8)


def decode_keep_mask(data: bytes, param: str, rule: UploadRule | int) -> np.ndarray:
    """Decode a mask in Stability's convention into repaint weights, uint8 (H, W): its
    gray level is what to keep (0, black: change; 255, white: keep), as its SDK documents
    for an ARTIFACT_MASK; an alpha channel is not read."""
    image = _to_8bit(_open(data, param, rule))
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
