"""What every HTTP front's routes share: the images service (on the app's state), a
form read from multipart, the answer (plan, run, log), and the response body."""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated, Any, Awaitable, TypeVar

from fastapi import Depends, Form, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from serve_app.protocol.errors import APIError, InvalidRequestError, error_from_exception
from serve_app.service.images import ImagesService
from serve_app.service.planning import GenerationPlan
from serve_app.protocol.request import ImageRequest

T = TypeVar("T")
logger = logging.getLogger("ray.serve")  # Serve's handler adds request id, deployment and replica


def images_service(request: Request) -> ImagesService:
    """The images service of the app serving ``request``: the one on its ``app.state``, where
    the ingress's constructor put it (fronts/ingress.py), or a test its own."""
    service = getattr(request.app.state, "service", None)
    if service is None:  # a server fault: a 500, never the client's 400
        raise RuntimeError("this app has no images service on its state (app.state.service)")
    return service


# A route's parameter: ``service: Service``.
Service = Annotated[ImagesService, Depends(images_service)]


class _MultipartAlias:
    """``Multipart[Model]``: a form model read from ``multipart/form-data``, so the OpenAPI
    document shows its file fields as uploads."""

    def __getitem__(self, model):
        return Annotated[model, Form(media_type="multipart/form-data")]


Multipart = _MultipartAlias()

# The multipart names an image upload comes under: OpenAI's `image`, and `image[]` for a list
# (today's openai client; OpenAI's newer models take up to 16 images on an edit).
IMAGE_PARTS = ("image", "image[]")


def count_images(form) -> int:
    """How many images a multipart form carries (its ``image`` and ``image[]`` parts)."""
    return sum(len(form.getlist(name)) for name in IMAGE_PARTS)


def check_one_image(count: int) -> None:
    """A 400 naming ``image`` unless exactly one image (or none: the form's own validation
    names a missing one) was sent: every model served here edits one image at a time."""
    if count > 1:
        raise InvalidRequestError(
            f"'image' takes one image, got {count}: the models served here edit one image at "
            "a time.", param="image")


async def _one_image(request: Request) -> None:
    # FastAPI has read the form already (Starlette keeps it on the request): no second read.
    check_one_image(count_images(await request.form()))


# A route's ``dependencies=[one_image]``: refuses several images before the form is validated.
one_image = Depends(_one_image)


def json_response(body: Any) -> Response:
    """An images response: JSON, or Server-Sent Events when the request streams.

    Serialize a response model once, in pydantic's Rust core: images make large bodies.
    Unset optional fields (``url`` beside ``b64_json``) are left out, as OpenAI does."""
    if not isinstance(body, BaseModel):
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return Response(content=body.model_dump_json(exclude_none=True), media_type="application/json")


def request_owner(request: Request) -> str:
    """Who the caller is, for what it leaves on the server (its jobs, its URL images) and for
    what its key may do: a hash of the key in its one ``Authorization`` header, as the gate read
    it, "" without one (``protocol.keys.owner_of``)."""
    from serve_app.fronts.gate import AUTHORIZATION_STATE, authorization_of, presented_key
    from serve_app.protocol.keys import owner_of

    authorization = request.scope.get("state", {}).get(AUTHORIZATION_STATE)
    if authorization is None:  # a route reached without the gate (an app of its own)
        authorization = authorization_of(request.scope.get("headers") or [])
    return owner_of(presented_key(authorization))


def asked_by(image_request: ImageRequest, request: Request) -> ImageRequest:
    """``image_request`` as its caller's: its ``owner`` from the request's one Authorization."""
    return dataclasses.replace(image_request, owner=request_owner(request))


def base_url(request: Request) -> str:
    """Scheme, host and route prefix the client used: the root of returned image URLs."""
    return str(request.base_url).rstrip("/")


async def guarded(call: Awaitable[T], retry_after_s: int = 5) -> T:
    """Await ``call``; any failure becomes the APIError the client should see."""
    try:
        return await call
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to the envelope, logged with traceback
        raise error_from_exception(exc, retry_after_s) from None


async def answer(request: Request, service: ImagesService, planning: Awaitable[GenerationPlan]):
    """Plan, then run: errors mapped to the envelope, the planned model and the images
    recorded for the metrics, and one log line (Serve adds the request id to it)."""
    retry_after_s = service.config.ingress.retry_after_s
    plan = await guarded(planning, retry_after_s)
    request.state.model = plan.model
    result = await guarded(service.execute(plan, base_url(request), owner=request_owner(request)),
                           retry_after_s)
    if not isinstance(result, BaseModel):  # a stream: it logs nothing more here
        logger.info("%s model=%s streamed", request.url.path, plan.model)
        return result
    request.state.images = len(result.data)
    logger.info("%s model=%s images=%d size=%s seeds=%s", request.url.path, plan.model,
                len(result.data), result.size, [item.seed for item in result.data])
    return result
