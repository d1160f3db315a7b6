"""OpenAI's Images API: its routes, request bodies and forms (responses and the error
envelope are the service's own, in OpenAI's shapes).

Field names follow OpenAI's Images API; the extension fields (``seed``,
``negative_prompt``, ``guidance_scale``, ``num_inference_steps``, ``high_noise_frac``, ``loras``)
follow the services our users come from. Each request model converts itself into the one
:class:`~serve_app.service.request.ImageRequest` (``to_request``). No torch, no Ray here.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Request, UploadFile
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from serve_app.fronts.openapi import (
    IMAGE_CONTENT_TYPES,
    LORAS_JSON_SCHEMA,
    UPLOAD_LIMITS,
    form_schema,
    request_schema,
    responses,
    upload_schema,
)
from serve_app.fronts.shared import Multipart, Service, answer, asked_by, guarded, json_response, one_image
from serve_app.service.responses import (
    ErrorResponse,
    HealthResponse,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from serve_app.service.request import (
    LORA_WEIGHT_MAX,
    LORA_WEIGHT_MIN,
    MAX_GUIDANCE,
    MAX_LORAS_JSON_CHARS,
    MAX_N,
    MAX_NOISE_LEVEL,
    MAX_PARTIAL_IMAGES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    ImageRequest,
    NameField,
    TextField,
    Loras,
    LoraWeight,
    lora_set,
    lora_set_from_json,
    PromptField,
    SizeField,
)

# The request bodies' schema names LoraWeight; the responses are the service's own
# (serve_app/service/responses.py), in OpenAI's shapes.
__all__ = ["LoraWeight", "ErrorResponse", "ImagesResponse", "ModelCard", "ModelList", "HealthResponse"]


def _check_json_loras(value: str | None) -> str | None:
    lora_set_from_json(value)
    return value


def _check_loras(value):
    lora_set(value)
    return value


_LORAS_DESCRIPTION = (
    "LoRA adapters of the model (GET /v1/models/{model} lists them) and their weights "
    f"({LORA_WEIGHT_MIN} to {LORA_WEIGHT_MAX}; omitted: the adapter's default)"
)


_MODERATION = (
    "Safety-checker strictness: 'auto' applies the server's policy (flag, blur or reject); "
    "'low' checks and marks images but returns them as made. Ignored without a checker."
)
Moderation = Literal["auto", "low"]



class _Strict(BaseModel):
    """Unknown fields are an error: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


_REQUEST_FIELDS = frozenset(f.name for f in fields(ImageRequest))


class _ImageOptions(_Strict):
    """Fields every images route takes."""

    model_config = ConfigDict(json_schema_extra=request_schema)

    model: NameField | None = Field(
        default=None,
        description="Served model name or alias (GET /v1/models lists them); the configured "
        "default if omitted.",
    )
    n: int = Field(default=1, ge=1, le=MAX_N, description="Number of images.")
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json",
        description="How images are returned: base64 in 'b64_json', or a download link in 'url'.",
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        default="png", description="Encoding of the returned images."
    )
    output_compression: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Quality (0-100) for jpeg and webp (not png); 100 keeps the most detail. "
        "Default 100.",
    )
    user: NameField | None = Field(default=None, description="End-user identifier, for the logs.")
    negative_prompt: TextField | None = Field(default=None, description="What the image should not show.")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Seed of image 0; image i uses seed + i. Drawn at random when omitted.",
    )
    guidance_scale: float | None = Field(
        default=None, ge=0, le=MAX_GUIDANCE, description="Classifier-free guidance scale."
    )
    num_inference_steps: int | None = Field(
        default=None, ge=1, le=MAX_STEPS,
        description="Denoising steps of the schedule, at most the model's `limits.max_steps` "
        "(edits and variations run num_inference_steps x strength of them: the schedule is at "
        "most the model's `limits.max_schedule_steps`, the steps run at most `max_steps`).",
    )
    moderation: Moderation = Field(default="auto", description=_MODERATION)

    _task: ClassVar[str]

    def to_request(self) -> ImageRequest:
        """This request in the form planning takes."""
        values = {name: value for name, value in self if name in _REQUEST_FIELDS}
        if "loras" in values:
            loras = values["loras"]
            values["loras"] = lora_set_from_json(loras) if isinstance(loras, str) else lora_set(loras)
        return ImageRequest(task=self._task, **values)


class _Streaming(_Strict):
    stream: bool = Field(
        default=False,
        description="Answer with Server-Sent Events: one image (n 1) of one model (no refiner "
        "chain, no upscale).",
    )
    partial_images: int | None = Field(
        default=None, ge=0, le=MAX_PARTIAL_IMAGES,
        description=f"With stream: previews sent during denoising (0-{MAX_PARTIAL_IMAGES})."
    )


class ImageGenerationRequest(_Streaming, _ImageOptions):
    """Body of ``POST /v1/images/generations``."""

    _task = "generate"
    prompt: PromptField = Field(min_length=1, description="Text description of the desired image(s).")
    size: SizeField = Field(
        default=None,
        description="'WIDTHxHEIGHT' (one of the model's allowed sizes) or 'auto' for its default.",
    )
    high_noise_frac: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Refiner chains: fraction of the steps run by the base model (default 0.8).",
    )
    upscale: NameField | None = Field(
        default=None,
        description="Upscaler model to run on every generated image (output size x factor).",
    )
    loras: Annotated[
        Loras | None, AfterValidator(_check_loras)
    ] = Field(default=None, description=_LORAS_DESCRIPTION + ": a map of name to weight, or "
              'a list of {"name", "weight"}.')


_SIZE_DESCRIPTION = (
    "'WIDTHxHEIGHT' or 'auto': multiples of 8, each side at least the model's "
    "`limits.min_input_side`, at most its output pixels (`limits.max_pixels`, or the largest of "
    "`limits.sizes`); default: the input's size rounded down to multiples of 8."
)


class _ImageForm(_ImageOptions):
    """Multipart fields shared by the image-input routes."""

    model_config = ConfigDict(json_schema_extra=form_schema)

    image: UploadFile = Field(description="PNG, JPEG or WebP image (one; sent as `image`, or "
                              "as `image[]` as today's openai client sends a list). " + UPLOAD_LIMITS,
                              json_schema_extra=upload_schema)

    @model_validator(mode="before")
    @classmethod
    def _image_from_list(cls, data: Any) -> Any:
        """Today's openai client sends a list of images as ``image[]`` parts: one of them is
        the image (more are refused before this, by the route's ``one_image``)."""
        if isinstance(data, dict) and "image[]" in data and "image" not in data:
            data = dict(data)
            data["image"] = data.pop("image[]")
        return data


class _EditFields(_ImageForm):
    size: SizeField = Field(default=None, description=_SIZE_DESCRIPTION, examples=["auto"])
    loras: Annotated[str | None, AfterValidator(_check_json_loras)] = Field(
        default=None, max_length=MAX_LORAS_JSON_CHARS, description=_LORAS_DESCRIPTION + ', as JSON text: {"ink": 0.8} or '
        '[{"name": "ink", "weight": 0.8}].', json_schema_extra=LORAS_JSON_SCHEMA)
    strength: float | None = Field(
        default=None, gt=0, le=1, description="How far to move from the input (0 < s <= 1)."
    )


class ImageEditForm(_Streaming, _EditFields):
    """Multipart body of ``POST /v1/images/edits``."""

    _task = "edit"
    prompt: PromptField = Field(min_length=1, description="What the edited image should show.")
    mask: UploadFile | None = Field(
        default=None,
        description="Same size as image; fully transparent pixels mark the area to repaint "
        "(without an alpha channel: white marks it). PNG, JPEG or WebP, as image; an alpha "
        "channel without a transparent pixel is refused (nothing to edit).",
        json_schema_extra=upload_schema,
    )
    upscale: NameField | None = Field(
        default=None,
        description="Upscaler (GET /v1/models lists those with the upscale capability) to run "
        "on every result.",
    )


class ImageVariationForm(_EditFields):
    """Multipart body of ``POST /v1/images/variations``: image to image without a prompt."""

    _task = "variation"


class UpscaleForm(_ImageForm):
    """Multipart body of ``POST /v1/images/upscale``."""

    _task = "upscale"
    prompt: TextField = Field(default="", description="Guides diffusion upscalers; esrgan ignores it.")
    noise_level: int | None = Field(default=None, ge=0, le=MAX_NOISE_LEVEL, description="x4 upscaler only.")
    width: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_SIDE,
        description="Output width (the height keeps the aspect ratio); not with height. The "
        "output is at most the upscaler's `limits.max_output_pixels`.")
    height: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_SIDE,
        description="Output height (the width keeps the aspect ratio); not with width. The "
        "output is at most the upscaler's `limits.max_output_pixels`.")


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
