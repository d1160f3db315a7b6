"""Every size rule, in one place: how a size is written, which sizes a model makes from
text, the output size of an edit, and the input and output sizes of an upscale.

The config validates its defaults with the same rules (serve_app/config/generation.py's
``GenerationLimits`` asks :func:`allows`), and planning computes every request's output size
here, raising a 400 that names the field to change. No torch, no Ray.
"""

from __future__ import annotations

import re
from typing import Any

from serve_app.protocol.errors import InvalidRequestError

_SIZE_RE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
# A size field's JSON-schema pattern: the same rule, or "auto".
SIZE_PATTERN = "^(auto|" + _SIZE_RE.pattern.strip("^$") + ")$"
# Sizes are multiples of the VAE's spatial factor: a latent pixel is 8x8 image pixels.
MULTIPLE = 8


def parse_size(size: str) -> tuple[int, int]:
    """Parse ``"WIDTHxHEIGHT"`` into ``(width, height)``; raise ``ValueError`` otherwise."""
    match = _SIZE_RE.match(size)
    if not match:
        raise ValueError(f"size must be 'WIDTHxHEIGHT', such as '512x512'; got {size!r}")
    return int(match.group(1)), int(match.group(2))


# ---------------------------------------------------------------------------------------
# A model's limits (``limits:`` of a model in the config)
# ---------------------------------------------------------------------------------------


def output_pixels(limits: Any) -> int:
    """Largest allowed output area: max_pixels, or the largest of the named sizes."""
    named = max((w * h for w, h in map(parse_size, limits.sizes)), default=0)
    return max(limits.max_pixels or 0, named)


def allows(limits: Any, width: int, height: int) -> bool:
    """Whether text-to-image may make ``width`` x ``height``: a named size, or any size in
    multiples of 8 within min_side, min_pixels and max_pixels."""
    if f"{width}x{height}" in limits.sizes:
        return True
    return (
        limits.max_pixels is not None
        and width % MULTIPLE == 0
        and height % MULTIPLE == 0
        and min(width, height) >= limits.min_side
        and (limits.min_pixels or 0) <= width * height <= limits.max_pixels
    )


def describe_sizes(limits: Any) -> str:
    """The allowed text-to-image sizes, in words, for error messages."""
    parts = []
    if limits.max_pixels is not None:
        fewest = f"at least {limits.min_pixels} and " if limits.min_pixels else ""
        parts.append(
            f"any WIDTHxHEIGHT in multiples of 8 with both sides at least {limits.min_side} "
            f"and {fewest}at most {limits.max_pixels} pixels"
        )
    if limits.sizes:
        parts.append(", ".join(limits.sizes))
    return "; or ".join(parts) or "none"


# ---------------------------------------------------------------------------------------
# A request's output size, per operation
# ---------------------------------------------------------------------------------------


def generation_size(served: Any, size: str | None) -> tuple[int, int]:
    """Text-to-image: the size asked for (or the model's default), if the model makes it."""
    width, height = parse_size(served.defaults.size if size in (None, "auto") else size)
    if not allows(served.limits, width, height):
        raise InvalidRequestError(
            f"{width}x{height} (width x height) is not a size {served.name} makes; allowed: "
            f"{describe_sizes(served.limits)}",
            param="size",
        )
    return width, height


def edit_size(served: Any, size: str | None, image_width: int, image_height: int) -> tuple[int, int]:
    """An edit or variation: the size asked for, else the input's rounded down to 8."""
    if size in (None, "auto"):
        width, height = image_width // MULTIPLE * MULTIPLE, image_height // MULTIPLE * MULTIPLE
        param = "image"
    else:
        width, height = parse_size(size)
        param = "size"
        if width % MULTIPLE or height % MULTIPLE:
            raise InvalidRequestError(
                f"size {size!r}: width and height must be multiples of 8", param="size"
            )
    if min(width, height) < served.min_input_side:
        raise InvalidRequestError(
            f"{served.name} edits images of at least {served.min_input_side} pixels a side; "
            f"the output would be {width}x{height}",
            param=param,
        )
    most = output_pixels(served.limits)
    if width * height > most:
        raise InvalidRequestError(
            f"{width}x{height} is over {served.name}'s limit of {most} output pixels", param=param
        )
    return width, height


def upscale_input(upscaler: Any, width: int, height: int, chained: bool = False) -> None:
    """An upscaler's input: at most ``max_input_pixels``; an uploaded image (not ``chained``
    after a generation or edit, whose sizes are already a model's) also at least
    ``min_input_side`` a side."""
    limit = upscaler.limits.max_input_pixels
    if chained and width * height > limit:
        raise InvalidRequestError(
            f"{upscaler.name} takes at most {limit} input pixels; {width}x{height} is "
            f"{width * height}. Ask for a smaller size or another upscaler.",
            param="upscale",
        )
    if chained:
        return
    if width * height > limit:
        raise InvalidRequestError(
            f"{upscaler.name} takes at most {limit} input pixels; the image is "
            f"{width}x{height} = {width * height}",
            param="image",
        )
    if min(width, height) < upscaler.min_input_side:
        raise InvalidRequestError(
            f"{upscaler.name} needs an image of at least {upscaler.min_input_side} pixels a side; "
            f"the image is {width}x{height}",
            param="image",
        )


def upscale_size(upscaler: Any, in_width: int, in_height: int, width: int | None,
                 height: int | None) -> tuple[int, int]:
    """An upscale's output: ``width`` or ``height`` (the other keeps the aspect ratio), else
    the input times the upscaler's factor; at most ``max_output_pixels``."""
    if width is not None and height is not None:
        raise InvalidRequestError(
            "give width or height, not both: the other follows the image's aspect ratio",
            param="height",
        )
    if width is not None:
        out_w, out_h, param = width, max(1, round(width * in_height / in_width)), "width"
    elif height is not None:
        out_w, out_h, param = max(1, round(height * in_width / in_height)), height, "height"
    else:
        factor = upscaler.upscale_factor
        out_w, out_h, param = in_width * factor, in_height * factor, "image"
    if out_w * out_h > upscaler.max_output_pixels:
        raise InvalidRequestError(
            f"{upscaler.name} makes at most {upscaler.max_output_pixels} output pixels; "
            f"{out_w}x{out_h} is {out_w * out_h}",
            param=param,
        )
    return out_w, out_h
