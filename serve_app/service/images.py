"""The images service: decodes uploads, plans a request (serve_app/service/planning.py), runs the
plan (serve_app/service/execution.py) and encodes the result.

Independent of HTTP and of Ray: it is handed a ``{deployment name: handle}`` map, so unit
tests can drive it with fake handles.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np

from deployments.contract import unwrap
from serve_app.config import SAFETY_NAME, AppConfig
from serve_app.service.errors import (
    GatewayTimeoutError,
    ModelNotFoundError,
    ModelUnavailableError,
    ModerationBlockedError,
    NotFoundError,
    error_from_exception,
)
from serve_app.service.execution import run_plan, stream_plan
from serve_app.service.encoding import encode_image
from serve_app.service.planning import GenerationPlan, plan_request
from serve_app.service.request import ImageRequest
from serve_app.service.responses import ImageData, ImagesResponse, ImagesUsage, LoraCard, ModelCard, ModelList
from serve_app.service.uploads import decode_image, decode_mask, resize


def sse(payload: dict) -> str:
    """One Server-Sent Event, named after the payload's type."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"


class ResultShapeError(RuntimeError):
    """A deployment returned a different number or size of images than planned."""


T = TypeVar("T")

# While a request waits, how often it looks whether a deployment it needs cannot start.
START_WATCH_FIRST_S, START_WATCH_EVERY_S = 1.0, 2.0


class ImagesService:
    """``start_failures``, when given, answers ``{deployment: cause}`` for the deployments
    that have no running replica because their replicas fail to start (the ingress reads
    Serve's status); a request waiting on one of them fails with a 503 naming the cause
    instead of waiting out its timeout."""

    def __init__(self, config: AppConfig, handles: dict[str, Any], store: Any = None,
                 start_failures: Callable[[], Awaitable[dict[str, str]]] | None = None):
        self.config = config
        self.handles = handles
        self.store = store  # the ImageStore deployment's handle (response_format "url")
        self.start_failures = start_failures
        self.on_demand = config.on_demand_deployments()  # woken early in a chain (execution.py)
        self.created = int(time.time())

    async def _unless_start_fails(self, work: Awaitable[T], deployments: tuple[str, ...]) -> T:
        """Await ``work``; if one of ``deployments`` cannot start a replica meanwhile, cancel
        it and raise :class:`ModelUnavailableError` (a load that fails for the server's
        reasons, such as weights missing on the server, is the server's fault)."""
        if self.start_failures is None:
            return await work
        task = asyncio.ensure_future(work)
        wait_s = START_WATCH_FIRST_S
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=wait_s)
                if done:
                    return task.result()
                wait_s = START_WATCH_EVERY_S
                failures = await self.start_failures()
                failed = next((name for name in deployments if name in failures), None)
                if failed is not None:
                    what = "The safety checker" if failed == SAFETY_NAME else f"The model '{failed}'"
                    raise ModelUnavailableError(what, failures[failed],
                                                self.config.ingress.retry_after_s)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def plan(self, request: ImageRequest, image=None, mask=None) -> GenerationPlan:
        """Decode a request's uploads and plan it: 400 or 404 before any model work.

        ``image`` and ``mask`` are uploads (anything with an async ``read``); every route
        plans the same way, on the event loop (planning is cheap; decoding runs in a thread).
        """
        pixels = await self._decode(image, "image") if image is not None else None
        alpha = await self._decode(mask, "mask", decode_mask) if mask is not None else None
        return plan_request(request, self.config, pixels, alpha)

    async def generate(self, request: ImageRequest, base_url: str = "") -> ImagesResponse:
        """Plan and run a generation (for callers without HTTP: tests, notebooks)."""
        return await self.execute(await self.plan(request), base_url)

    async def image_file(self, image_id: str) -> tuple[bytes, str]:
        """Answer ``GET /v1/images/files/{id}``: 404 when unknown or expired."""
        found = await self.store.get.remote(image_id) if self.store is not None else None
        if found is None:
            raise NotFoundError("No image with this id: it never existed or it has expired.")
        return found

    async def _decode(self, upload, param: str, decoder=decode_image) -> np.ndarray:
        data = await upload.read()
        return await asyncio.to_thread(decoder, data, param, self.config.ingress.max_upload_pixels)

    async def execute(self, plan: GenerationPlan, base_url: str = ""):
        """Run a plan's stages and encode the result; 504 past the request timeout.

        A streamed plan returns an async iterator of Server-Sent Events instead.
        """
        if plan.stream:
            return self._stream(plan, base_url)
        timeout_s = self.config.ingress.request_timeout_s
        try:
            images = await self._unless_start_fails(
                run_plan(plan, self.handles, timeout_s, self.on_demand), plan.deployments)
        except TimeoutError:
            raise GatewayTimeoutError(timeout_s) from None
        return await self._respond(plan, images, base_url)

    async def _stream(self, plan: GenerationPlan, base_url: str):
        """``image_generation.partial_image`` events during denoising, then
        ``image_generation.completed`` (OpenAI's streaming shape); an ``error`` event if the
        work fails after the stream began."""
        timeout_s = self.config.ingress.request_timeout_s
        common = {"size": plan.size, "output_format": plan.output_format, "quality": "auto",
                  "background": "opaque"}
        try:
            # Closed with this generator (a client that goes away): the replica's work stops.
            async with contextlib.aclosing(stream_plan(plan, self.handles, timeout_s, self.on_demand)) as events:
                while True:
                    try:
                        event = await self._unless_start_fails(anext(events), plan.deployments)
                    except StopAsyncIteration:
                        break
                    created = int(time.time())
                    if event[0] == "partial":
                        _, index, pixels = event
                        b64 = await asyncio.to_thread(self._encode_preview, plan, pixels)
                        yield sse({"type": "image_generation.partial_image", "b64_json": b64,
                                   "partial_image_index": index, "created_at": created, **common})
                    else:
                        response = await self._respond(plan, event[1], base_url)
                        item = response.data[0]
                        yield sse({"type": "image_generation.completed",
                                   **item.model_dump(exclude_none=True), "created_at": created,
                                   "usage": response.usage.model_dump(), **common})
        except Exception as exc:  # noqa: BLE001 - told to the client as the stream's last event
            error = GatewayTimeoutError(timeout_s) if isinstance(exc, TimeoutError) else error_from_exception(exc)
            yield sse({"type": "error", "error": error.to_response().error.model_dump()})

    def _encode_preview(self, plan: GenerationPlan, pixels: np.ndarray) -> str:
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

    async def _respond(self, plan: GenerationPlan, result, base_url: str = "") -> ImagesResponse:
        images, cost = unwrap(result)
        flags = cost.nsfw if cost is not None and plan.safety is not None else None
        if plan.safety is not None and (flags is None or len(flags) != len(plan.seeds)):
            raise ResultShapeError(f"the safety checker judged {flags} for {len(plan.seeds)} images")
        if flags is not None and plan.reject_flagged and any(flags):
            raise ModerationBlockedError(sum(flags), len(flags), plan.moderation_param)

        def finish_and_encode() -> list[bytes]:
            return [self._encode(pixels, plan) for pixels in self._finish_pixels(plan, images)]

        encoded = await asyncio.to_thread(finish_and_encode)
        if plan.response_format == "url":
            data = await self._store(encoded, plan, base_url)
        else:
            data = [ImageData(b64_json=base64.b64encode(blob).decode("ascii"), seed=seed)
                    for blob, seed in zip(encoded, plan.seeds)]
        if flags is not None:
            for item, flag in zip(data, flags):
                item.nsfw = flag
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=plan.output_format,
            size=plan.size,
            usage=ImagesUsage(
                denoising_steps=cost.steps if cost else 0,
                output_pixels=len(plan.seeds) * plan.width * plan.height,
                model_seconds=round(cost.seconds, 4) if cost else 0.0,
            ),
        )

    async def _store(self, encoded: list[bytes], plan: GenerationPlan, base_url: str) -> list[ImageData]:
        mime = f"image/{plan.output_format}"
        ids = await asyncio.gather(*(self.store.put.remote(blob, mime) for blob in encoded))
        root = (self.config.image_store.public_base_url or base_url).rstrip("/")
        return [ImageData(url=f"{root}/v1/images/files/{image_id}", seed=seed)
                for image_id, seed in zip(ids, plan.seeds)]

    def _card(self, entry) -> ModelCard:
        model = self.config.prompted_model(entry)
        lora_fields = {}
        if model.info.takes_loras:
            lora_fields = dict(
                loras=[LoraCard(name=a.name, default_weight=a.default_weight)
                       for a in model.requestable_loras],
                allow_hub_loras=model.allow_hub_loras,
                max_loras_per_request=model.max_loras_per_request,
            )
        return ModelCard(id=entry.name, created=self.created, owned_by=entry.owned_by,
                         capabilities=sorted(entry.capabilities), **lora_fields)

    def list_models(self) -> ModelList:
        """Answer ``GET /v1/models``: every served name (aliases are accepted, not listed)."""
        return ModelList(data=[self._card(e) for e in [*self.config.models, *self.config.chains]])

    def get_model(self, model_id: str) -> ModelCard:
        entry = self.config.resolve(model_id)
        if entry is None:
            raise ModelNotFoundError(model_id, self.config.served_names())
        return self._card(entry)
