"""Encoding: a plan's result (uint8 arrays from the last stage) into the images response
the client asked for: checked against the plan, resized to the exact size asked for,
encoded as PNG, JPEG or WebP, as base64 or stored behind a URL, with the safety flags and
the usage.

This runs in the ingress, on CPU, so GPU replicas are free for the next batch as soon as
they return pixels.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from deployments.contract import unwrap
from serve_app.config import AppConfig
from serve_app.protocol.errors import ModerationBlockedError
from serve_app.service.planning import GenerationPlan
from serve_app.protocol.responses import ImageData, ImagesResponse, ImagesUsage
from serve_app.service.uploads import resize

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(
    pixels: np.ndarray, output_format: str, compression: int | None = None, png_level: int = 6,
    png_encoder: str = "fpng",
) -> bytes:
    """Encode one (H, W, 3) uint8 image.

    ``compression`` is OpenAI's ``output_compression`` (0-100) and becomes the jpeg/webp
    quality; it defaults to 100 as OpenAI's does. PNG goes through fpng (much faster than zlib,
    files of about the same size: ``python3 benchmarks/sim.py`` times both, in
    benchmarks/results/sim-h100.md) unless ``png_encoder`` is "zlib": Pillow at
    ``png_level``, smallest files at 6 and up.
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


@dataclass(frozen=True)
class EncodedImage:
    """One finished image: its encoded bytes, its seed, and whether the safety checker
    flagged it (None: no checker ran)."""

    blob: bytes
    seed: int
    nsfw: bool | None = None


class ResultShapeError(RuntimeError):
    """A deployment returned a different number or size of images than planned."""


class ResponseEncoder:
    """Builds a plan's images response, with the ingress's encoder settings and the image
    store's client (``response_format: "url"``: an ImageStoreClient)."""

    def __init__(self, config: AppConfig, store: Any = None):
        self.config = config
        self.store = store

    def preview(self, plan: GenerationPlan, pixels: np.ndarray) -> str:
        """A streamed preview, at the plan's size, as base64 of the plan's format."""
        from PIL import Image

        scaled = resize(pixels, plan.width, plan.height, Image.Resampling.BILINEAR)
        return base64.b64encode(self._encode(scaled, plan)).decode("ascii")

    def _encode(self, pixels: np.ndarray, plan: GenerationPlan) -> bytes:
        ingress = self.config.ingress
        return encode_image(pixels, plan.output_format, plan.output_compression,
                            ingress.png_compress_level, ingress.png_encoder)

    def _finish_pixels(self, plan: GenerationPlan, images: np.ndarray) -> list[np.ndarray]:
        count = len(plan.seeds)
        shape = getattr(images, "shape", None)
        if shape is None or len(shape) != 4 or shape[0] != count or shape[3] != 3:
            # Never hand a client fewer or other images than it asked for.
            raise ResultShapeError(
                f"{plan.model} returned {shape or type(images)}, expected {count} RGB images"
            )
        # Upscalers answer factor x their input; an asked width or height (the aspect
        # ratio kept) is reached here with a high-quality resize.
        return [resize(image, plan.width, plan.height) for image in images]

    async def encode(self, plan: GenerationPlan, result) -> tuple[list[EncodedImage], ImagesUsage]:
        """``result`` (a stage's images and the request's cost) checked against the plan,
        resized, encoded in the plan's format, each with the seed the replica made it with
        (``StageResult.seeds``) and its safety flag; and the usage. A flagged image fails the
        request here when the plan rejects flagged ones."""
        images, cost = unwrap(result)
        flags = cost.nsfw if cost is not None and plan.safety is not None else None
        if plan.safety is not None and (flags is None or len(flags) != len(plan.seeds)):
            raise ResultShapeError(f"the safety checker judged {flags} for {len(plan.seeds)} images")
        if flags is not None and plan.reject_flagged and any(flags):
            raise ModerationBlockedError(sum(flags), len(flags), plan.moderation_param)

        def finish_and_encode() -> list[bytes]:
            return [self._encode(pixels, plan) for pixels in self._finish_pixels(plan, images)]

        encoded = await asyncio.to_thread(finish_and_encode)
        seeds = cost.seeds if cost is not None else ()
        if len(seeds) != len(encoded):
            # Every image is labelled with what made it: never a seed the replica did not use.
            raise ResultShapeError(f"{plan.model} reported the seeds {seeds} for {len(encoded)} images")
        usage = ImagesUsage(
            denoising_steps=cost.steps if cost else 0,
            output_pixels=len(plan.seeds) * plan.width * plan.height,
            model_seconds=round(cost.seconds, 4) if cost else 0.0,
        )
        flags = flags if flags is not None else [None] * len(encoded)
        return [EncodedImage(blob, seed, flag)
                for blob, seed, flag in zip(encoded, seeds, flags)], usage

    async def respond(self, plan: GenerationPlan, result, base_url: str = "",
                      owner: str = "") -> ImagesResponse:
        """The images response of ``result`` (a stage's images and the request's cost);
        URL images are ``owner``'s in the store."""
        encoded, usage = await self.encode(plan, result)
        if plan.response_format == "url":
            data = await self._store(encoded, plan, base_url, owner)
        else:
            data = [ImageData(b64_json=base64.b64encode(image.blob).decode("ascii"), seed=image.seed)
                    for image in encoded]
        for item, image in zip(data, encoded):
            item.nsfw = image.nsfw
        return ImagesResponse(created=int(time.time()), data=data,
                              output_format=plan.output_format, size=plan.size, usage=usage)

    async def _store(self, encoded: list[EncodedImage], plan: GenerationPlan, base_url: str,
                     owner: str = "") -> list[ImageData]:
        mime = f"image/{plan.output_format}"
        # One call for the request's images: stored all together, or refused all together.
        ids = await self.store.put_many([(image.blob, mime) for image in encoded], owner)
        root = (self.config.image_store.public_base_url or base_url).rstrip("/")
        return [ImageData(url=f"{root}/v1/images/files/{image_id}", seed=image.seed)
                for image_id, image in zip(ids, encoded)]
