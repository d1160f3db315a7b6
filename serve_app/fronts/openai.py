"""OpenAI's Images API: its routes (request bodies and forms in fronts/wire.py, shared with
the jobs; responses and the error envelope are the service's own, in OpenAI's shapes).

Each route converts its body into the one
:class:`~serve_app.protocol.request.ImageRequest` (``to_request``), asks the images service
and answers in OpenAI's shape. No torch, no Ray here.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve_app.fronts.openapi import IMAGE_CONTENT_TYPES, responses
from serve_app.fronts.shared import Multipart, Service, answer, asked_by, guarded, json_response, one_image
from serve_app.fronts.wire import (
    ImageEditForm,
    ImageGenerationRequest,
    ImageVariationForm,
    LoraWeight,
    UpscaleForm,
)
from serve_app.protocol.responses import (
    ErrorResponse,
    HealthResponse,
    ImagesResponse,
    ModelCard,
    ModelList,
)

# The routes' bodies (fronts/wire.py) and responses (serve_app/protocol/responses.py).
__all__ = ["ImageGenerationRequest", "ImageEditForm", "ImageVariationForm", "UpscaleForm", "LoraWeight",
           "ErrorResponse", "ImagesResponse", "ModelCard", "ModelList", "HealthResponse"]


# ---------------------------------------------------------------------------------------
# The routes: each converts its body, asks the images service, answers in OpenAI's shape
# ---------------------------------------------------------------------------------------

router = APIRouter()
_UNKNOWN_MODEL = {404: "No served model by this name or alias (`model`): the message lists them."}
# The images routes: each may answer every error of a request that runs a model.
_IMAGES = responses(400, 404, 413, 503, 504, about=_UNKNOWN_MODEL)
_STREAMED_IMAGES = responses(400, 404, 413, 503, 504, about=_UNKNOWN_MODEL, stream=True)


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=_STREAMED_IMAGES)
async def create_image(request: Request, body: ImageGenerationRequest, service: Service) -> Response:
    """Text to image (OpenAI's ``images.generate``)."""
    return json_response(await answer(request, service, service.plan(asked_by(body.to_request(), request))))


@router.post("/v1/images/edits", response_model=ImagesResponse, responses=_STREAMED_IMAGES,
             dependencies=[one_image])
async def edit_image(request: Request, form: Multipart[ImageEditForm], service: Service) -> Response:
    """Image + prompt to image (OpenAI's ``images.edit``); inpainting with a mask."""
    planning = service.plan(asked_by(form.to_request(), request), form.image, form.mask)
    return json_response(await answer(request, service, planning))


@router.post("/v1/images/variations", response_model=ImagesResponse, responses=_IMAGES,
             dependencies=[one_image])
async def create_variation(request: Request, form: Multipart[ImageVariationForm],
                           service: Service) -> Response:
    """Variations of an image (OpenAI's ``images.create_variation``)."""
    return json_response(await answer(request, service, service.plan(asked_by(form.to_request(), request), form.image)))


@router.post("/v1/images/upscale", response_model=ImagesResponse, responses=_IMAGES,
             dependencies=[one_image])
async def upscale_image(request: Request, form: Multipart[UpscaleForm], service: Service) -> Response:
    """Upscale an image (x2 latent, x4 or ESRGAN), the seeds' multipart shape."""
    return json_response(await answer(request, service, service.plan(asked_by(form.to_request(), request), form.image)))


@router.get(
    "/v1/images/files/{image_id}",
    response_class=Response,
    # Open without a key: the unguessable id is the credential (fronts/gate.py).
    responses={**responses(404, 503, open_route=True, about={
                   404: "No image with this id: it never existed or it has expired.",
                   503: "The image store's replica failed: retry after `Retry-After` seconds."}),
               200: {"description": "The image, in the format it was made in.",
                     "content": {content_type: {"schema": {"type": "string", "format": "binary"}}
                                 for content_type in IMAGE_CONTENT_TYPES}}},
)
async def image_file(image_id: str, service: Service) -> Response:
    """An image answered with ``response_format: "url"``, until it expires."""
    data, content_type = await guarded(service.image_file(image_id),
                                       service.config.ingress.retry_after_s)
    return Response(content=data, media_type=content_type,
                    headers={"Cache-Control": "private, max-age=3600"})


@router.get("/v1/models", response_model=ModelList, responses=responses(),
            response_model_exclude_none=True)
async def list_models(service: Service) -> ModelList:
    """Served models in OpenAI's list shape."""
    return service.list_models()


@router.get("/v1/models/{model_id:path}", response_model=ModelCard,
            responses=responses(404, about=_UNKNOWN_MODEL), response_model_exclude_none=True)
async def retrieve_model(model_id: str, service: Service) -> ModelCard:
    """One served model, by name or alias."""
    return service.get_model(model_id)
