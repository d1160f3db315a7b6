"""The images service: normalize, plan, execute, encode. It decodes a request's uploads,
plans it (planning.py), runs the plan (execution.py) and encodes the answer (encoding.py).

Independent of HTTP and of Ray: it is handed a ``{deployment name: handle}`` map, so unit
tests can drive it with fake handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Awaitable, Callable

import numpy as np

from serve_app.config import AppConfig
from serve_app.protocol.errors import (
    GatewayTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    error_from_exception,
)
from serve_app.service.encoding import EncodedImage, ResponseEncoder
from serve_app.service.execution import Executor
from serve_app.service.planning import GenerationPlan, plan_request, upload_rule
from serve_app.protocol.request import ImageRequest
from serve_app.protocol.responses import ImagesResponse, ImagesUsage, LoraCard, ModelCard, ModelList
from serve_app.service.store import ImageStoreClient
from serve_app.service.uploads import UploadRule, decode_image, decode_mask


# The prefix of a stream's event types, per operation (OpenAI's names).
STREAM_EVENTS = {"generate": "image_generation", "edit": "image_edit"}


def sse(payload: dict) -> str:
    """One Server-Sent Event, named after the payload's type."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"


class ImagesService:
    """``start_failures``, when given, answers ``{deployment: cause}`` for the deployments
    that have no running replica because their replicas fail to start (the ingress reads
    Serve's status); a request waiting on one of them fails with a 503 naming the cause
    instead of waiting out its timeout."""

    def __init__(self, config: AppConfig, handles: dict[str, Any], store: Any = None,
                 start_failures: Callable[[], Awaitable[dict[str, str]]] | None = None,
                 low_moderation_owners: frozenset[str] = frozenset()):
        self.config = config
        # The callers (owners of the keys safety.allow_low_keys names) that may lower moderation.
        self.low_moderation_owners = low_moderation_owners
        self.handles = handles
        # The ImageStore deployment (response_format "url", job uploads), calls bounded in time.
        self.store = ImageStoreClient.of(store, config)
        self.encoder = ResponseEncoder(config, self.store)
        # Deployments that may be at zero replicas are woken early in a chain (on demand).
        self.executor = Executor(handles, config.ingress.request_timeout_s,
                                 config.on_demand_deployments(), start_failures,
                                 config.ingress.retry_after_s)
        self.created = int(time.time())
        # Decodes at once in this replica: each holds up to a few bytes a pixel of its image.
        self._decodes = asyncio.Semaphore(config.ingress.max_concurrent_decodes)

    async def plan(self, request: ImageRequest, image=None, mask=None,
                   mask_decoder: Callable[..., np.ndarray] = decode_mask) -> GenerationPlan:
        """Decode a request's uploads and plan it: 400 or 404 before any model work.

        ``image`` and ``mask`` are uploads (anything with an async ``read``); every route
        plans the same way, on the event loop (planning is cheap; decoding runs in a thread).
        ``mask_decoder`` reads the mask in its front's convention (OpenAI's by default).
        Each upload's size is checked from its header against the model's limits before it
        is decoded; a mask must be its image's size.
        """
        pixels = alpha = None
        if image is not None:
            rule = upload_rule(request, self.config, has_mask=mask is not None)
            pixels = await self._decode(image, "image", decode_image, rule)
        if mask is not None:
            alpha = await self._decode(mask, "mask", mask_decoder, self._mask_rule(pixels))
        return plan_request(request, self.config, pixels, alpha,
                            low_moderation_owners=self.low_moderation_owners)

    def _mask_rule(self, image: np.ndarray | None) -> UploadRule:
        """A mask is its image's size (either orientation here: EXIF rotation is applied
        after decoding, and planning compares the decoded sizes)."""
        limit = self.config.ingress.max_upload_pixels
        if image is None:
            return UploadRule(limit)
        height, width = image.shape[:2]

        def same_size(mask_width: int, mask_height: int) -> None:
            if sorted((mask_width, mask_height)) != sorted((width, height)):
                raise InvalidRequestError(
                    f"mask is {mask_width}x{mask_height} but image is {width}x{height}; they "
                    "must be the same size", param="mask")
        return UploadRule(limit, same_size)

    async def generate(self, request: ImageRequest, base_url: str = "", owner: str = "") -> ImagesResponse:
        """Plan and run a generation (for callers without HTTP: tests, notebooks)."""
        return await self.execute(await self.plan(request), base_url, owner=owner)

    async def image_file(self, image_id: str) -> tuple[bytes, str]:
        """Answer ``GET /v1/images/files/{id}``: 404 when unknown or expired, and at once
        (no call to the store) when ``image_id`` is not the shape of an id."""
        found = await self.store.get(image_id) if self.store is not None else None
        if found is None:
            raise NotFoundError("No image with this id: it never existed or it has expired.")
        return found

    async def _decode(self, upload, param: str, decoder, rule: UploadRule) -> np.ndarray:
        data = await upload.read()
        async with self._decodes:
            return await asyncio.to_thread(decoder, data, param, rule)

    async def execute(self, plan: GenerationPlan, base_url: str = "", owner: str = ""):
        """Run a plan's stages and encode the result; 504 past the request timeout.

        A streamed plan returns an async iterator of Server-Sent Events instead. ``owner``
        (the caller's key, as ``protocol.keys.owner_of`` names it) owns the URL images it makes.
        """
        if plan.stream:
            return self._stream(plan, base_url, owner)
        return await self.encoder.respond(plan, await self._execute(plan), base_url, owner=owner)

    async def images(self, plan: GenerationPlan) -> tuple[list[EncodedImage], ImagesUsage]:
        """Run a plan and encode its images, for a front that sends bytes (gRPC) instead of
        an images response."""
        return await self.encoder.encode(plan, await self._execute(plan))

    async def _execute(self, plan: GenerationPlan):
        """The plan's result; 504 past the request timeout."""
        try:
            return await self.executor.execute(plan)
        except TimeoutError:
            raise GatewayTimeoutError(self.config.ingress.request_timeout_s) from None

    async def _stream(self, plan: GenerationPlan, base_url: str, owner: str = ""):
        """``image_generation.partial_image`` events during denoising, then
        ``image_generation.completed`` (OpenAI's streaming shape; an edit's are
        ``image_edit.partial_image`` and ``image_edit.completed``, as OpenAI names them); an
        ``error`` event if the work fails after the stream began."""
        timeout_s = self.config.ingress.request_timeout_s
        kind = STREAM_EVENTS.get(plan.task, "image_generation")
        common = {"size": plan.size, "output_format": plan.output_format, "quality": "auto",
                  "background": "opaque"}
        try:
            # Closed with this generator (a client that goes away): the replica's work stops.
            async with contextlib.aclosing(self.executor.stream(plan)) as events:
                async for event in events:
                    created = int(time.time())
                    if event[0] == "partial":
                        _, index, pixels = event
                        b64 = await asyncio.to_thread(self.encoder.preview, plan, pixels)
                        yield sse({"type": f"{kind}.partial_image", "b64_json": b64,
                                   "partial_image_index": index, "created_at": created, **common})
                    else:
                        response = await self.encoder.respond(plan, event[1], base_url, owner=owner)
                        item = response.data[0]
                        yield sse({"type": f"{kind}.completed",
                                   **item.model_dump(exclude_none=True), "created_at": created,
                                   "usage": response.usage.model_dump(), **common})
        except Exception as exc:  # noqa: BLE001 - told to the client as the stream's last event
            error = GatewayTimeoutError(timeout_s) if isinstance(exc, TimeoutError) else error_from_exception(exc)
            yield sse({"type": "error", "error": error.to_response().error.model_dump()})

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
