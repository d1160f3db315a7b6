"""Livepeer's runner routes, for Livepeer's own client: its field names over our planning.

``POST /text-to-image`` (JSON), ``POST /image-to-image`` and ``POST /upscale`` (multipart)
take the fields of Livepeer's ai-runner and answer ``{"images": [{"url": "data:...",
"seed": ..., "nsfw": ...}]}``. Each adapter converts itself into the internal
:class:`~serve_app.protocol.request.ImageRequest`, as the OpenAI-shaped models do, and errors are
renamed back, so they name the field the client sent.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import APIRouter, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from serve_app.fronts.openapi import (
    LORAS_JSON_SCHEMA,
    UPLOAD_LIMITS,
    form_schema,
    responses,
    upload_schema,
)
from serve_app.fronts.error_handlers import ErrorShape, register_error_shape
from serve_app.fronts.shared import Multipart, Service, answer, asked_by, json_response
from serve_app.protocol.errors import APIError, InvalidRequestError, ModelNotFoundError
from serve_app.service.images import ImagesService
from serve_app.service.planning import GenerationPlan
from serve_app.protocol.request import (
    MAX_LORAS_JSON_CHARS,
    Guidance,
    ImageCount,
    ImageRequest,
    LoraSet,
    NameField,
    PromptField,
    Seed,
    Side,
    Steps,
    Strength,
    TextField,
    lora_set_from_json,
)
from serve_app.protocol.responses import ImagesResponse


# Our field -> Livepeer's, for error messages.
_PARAMS = {"model": "model_id", "n": "num_images_per_prompt", "size": "width",
           "moderation": "safety_check"}

# Livepeer's routes, with the trailing-slash twins its runner also answers.
LIVEPEER_PATHS = frozenset({"/text-to-image", "/image-to-image", "/upscale",
                            "/text-to-image/", "/image-to-image/", "/upscale/"})

# Livepeer's client (livepeer-ai) sends every field with these defaults, as its runner
# (livepeer/ai-worker, runner/app/routes) declares them.
TEXT_TO_IMAGE_STEPS = 50
IMAGE_TO_IMAGE_STEPS = 100
UPSCALE_STEPS = 75
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1024, 576
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = 0.8
DEFAULT_IMAGE_GUIDANCE = 1.5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_loras(loras: str) -> LoraSet:
    """``loras``: Livepeer's JSON map of adapter to weight (``""`` and ``{}``: none), the
    names checked against the model's adapters when the request is planned."""
    try:
        return lora_set_from_json(loras)
    except ValueError as error:
        raise InvalidRequestError(str(error), param="loras") from None


class _LivepeerCommon(_Strict):
    model_id: NameField = Field(
        default="",
        description="Served model name or alias (such as its Hub id; GET /v1/models lists "
        "them); '' for the default.",
    )
    safety_check: bool = Field(
        default=True,
        description="With a safety checker configured: true applies the server's policy "
        "(moderation 'auto'), false only marks flagged images (moderation 'low'). Without "
        "one, every image reports nsfw: false.",
    )
    seed: Seed | None = Field(default=None)

    @property
    def moderation(self) -> str:
        return "auto" if self.safety_check else "low"


class _LivepeerDiffusion(_LivepeerCommon):
    """Fields of text-to-image and image-to-image."""

    prompt: PromptField = Field(min_length=1)
    loras: str = Field(
        default="", max_length=MAX_LORAS_JSON_CHARS,
        description='LoRA adapters as a JSON map of name to weight, such as {"ink": 0.8}: the '
        "model's configured adapters, or Hub ids where the server allows them; empty for none.",
        json_schema_extra=LORAS_JSON_SCHEMA,
    )
    negative_prompt: TextField = Field(default="", description="What the image should not show.")
    guidance_scale: Guidance = Field(default=DEFAULT_GUIDANCE)
    num_images_per_prompt: ImageCount = Field(default=1)


def split_prompt(text: str) -> tuple[str, tuple[str, ...]]:
    """Livepeer's 'first | second' prompts: the first prompt and the further ones, each
    stripped, empty parts dropped (its runner's ``split_prompt``). A text without '|' is
    returned as it is."""
    if "|" not in text:
        return text, ()
    parts = [part.strip() for part in text.split("|") if part.strip()]
    return (parts[0], tuple(parts[1:])) if parts else ("", ())


class LivepeerTextToImageRequest(_LivepeerDiffusion):
    """JSON body of ``POST /text-to-image``. ``prompt`` and ``negative_prompt`` may hold
    one prompt per text encoder separated by '|' (SDXL: two)."""

    # Split at '|', the first prompt must not be blank.
    prompt: PromptField = Field(min_length=1, json_schema_extra={"pattern": r"[^\s|]"})

    width: Side = Field(default=DEFAULT_WIDTH)
    height: Side = Field(default=DEFAULT_HEIGHT)
    num_inference_steps: Steps = Field(default=TEXT_TO_IMAGE_STEPS)

    def to_request(self) -> ImageRequest:
        prompt, more_prompts = split_prompt(self.prompt)
        negative, more_negatives = split_prompt(self.negative_prompt)
        if not prompt:
            raise InvalidRequestError("prompt must not be blank", param="prompt")
        return ImageRequest(
            task="generate",
            moderation=self.moderation,
            prompt=prompt,
            more_prompts=more_prompts,
            more_negative_prompts=more_negatives,
            loras=parse_loras(self.loras),
            model=self.model_id or None,
            n=self.num_images_per_prompt,
            size=f"{self.width}x{self.height}",
            negative_prompt=negative,
            seed=self.seed,
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps,
        )


_IMAGE_DESCRIPTION = "The input image: PNG, JPEG or WebP. " + UPLOAD_LIMITS


class LivepeerImageToImageForm(_LivepeerDiffusion):
    """Multipart body of ``POST /image-to-image``."""

    model_config = ConfigDict(json_schema_extra=form_schema)

    image: UploadFile = Field(description=_IMAGE_DESCRIPTION, json_schema_extra=upload_schema)
    strength: Strength = Field(default=DEFAULT_STRENGTH)
    image_guidance_scale: Guidance = Field(
        default=DEFAULT_IMAGE_GUIDANCE,
        description="InstructPix2Pix models only: how closely to follow the input image. "
        "Accepted and ignored by every model served here, as Livepeer's runner ignores it "
        "for every other model.",
    )
    num_inference_steps: Steps = Field(
        default=IMAGE_TO_IMAGE_STEPS,
        description="Steps of the whole schedule, at most the model's `limits.max_schedule_steps`; "
        "num_inference_steps x strength of them run, at most its `limits.max_steps`.",
    )

    def to_request(self) -> ImageRequest:
        return ImageRequest(
            task="edit",
            moderation=self.moderation,
            loras=parse_loras(self.loras),
            prompt=self.prompt,
            model=self.model_id or None,
            n=self.num_images_per_prompt,
            negative_prompt=self.negative_prompt,
            strength=self.strength,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            num_inference_steps=self.num_inference_steps,
        )


class LivepeerUpscaleForm(_LivepeerCommon):
    """Multipart body of ``POST /upscale``."""

    model_config = ConfigDict(json_schema_extra=form_schema)

    image: UploadFile = Field(description=_IMAGE_DESCRIPTION, json_schema_extra=upload_schema)
    prompt: TextField = Field(default="", description="Guides the diffusion upscalers.")
    num_inference_steps: Steps = Field(
        default=UPSCALE_STEPS,
        description="Diffusion upscalers' steps; ESRGAN (one forward pass) ignores it, as "
        "Livepeer's runner sets the steps of fixed-step models itself.",
    )

    def to_request(self) -> ImageRequest:
        return ImageRequest(
            task="upscale",
            moderation=self.moderation,
            prompt=self.prompt,
            model=self.model_id or None,
            seed=self.seed,
            num_inference_steps=self.num_inference_steps,
        )


class LivepeerMedia(BaseModel):
    url: str = Field(description="The image as a data: URL.")
    seed: int
    nsfw: bool


class LivepeerImageResponse(BaseModel):
    images: list[LivepeerMedia]


class LivepeerAPIError(BaseModel):
    msg: str = Field(description="The error message, naming the field at fault.")


class LivepeerHTTPError(BaseModel):
    """Livepeer's error body (400, 401, 413, 500, 503, 504)."""

    detail: LivepeerAPIError


class LivepeerValidationError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class LivepeerHTTPValidationError(BaseModel):
    """Livepeer's 422 body: fields of the wrong type or out of range."""

    detail: list[LivepeerValidationError]


def to_livepeer(response: ImagesResponse) -> LivepeerImageResponse:
    mime = f"image/{response.output_format}"
    return LivepeerImageResponse(
        images=[
            LivepeerMedia(url=f"data:{mime};base64,{item.b64_json}", seed=item.seed,
                          nsfw=bool(item.nsfw))
            for item in response.data
        ]
    )


def rename_param(error: APIError) -> APIError:
    """Name the Livepeer field in an error raised for the OpenAI-shaped request."""
    if error.param in _PARAMS:
        error.param = _PARAMS[error.param]
    return error


def livepeer_error(error: APIError) -> tuple[int, dict]:
    """Status and body of ``error`` as Livepeer's runner answers: ``{"detail": {"msg":
    ...}}``, the field named in the message; an unknown model is a 400, as the runner
    answers a request for a model it was not started with."""
    status = 400 if isinstance(error, ModelNotFoundError) else error.status_code
    message = error.message
    if error.param and not message.startswith(error.param):
        message = f"{error.param}: {message}"
    return status, {"detail": {"msg": message}}


def livepeer_validation_errors(errors: list[dict]) -> dict:
    """FastAPI's 422 body, as Livepeer's runner (a FastAPI app) answers it: ``loc``,
    ``msg`` and ``type`` of each error, without the echoed input."""
    return {"detail": [
        {"loc": [p if isinstance(p, (int, str)) else str(p) for p in e.get("loc", ())],
         "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors
    ]}


# ---------------------------------------------------------------------------------------
# The routes, each with its trailing-slash twin (the runner answers both)
# ---------------------------------------------------------------------------------------

router = APIRouter()
register_error_shape(ErrorShape(LIVEPEER_PATHS, livepeer_error, livepeer_validation_errors))
# Every error in Livepeer's shapes, the gate's 401 and 413 included (fronts/error_handlers.py).
_ERRORS = responses(400, 413, 422, 503, 504, error=LivepeerHTTPError,
                    models={422: LivepeerHTTPValidationError}, about={
                        400: "The request is invalid, or asks for more than the model allows "
                             "(an unknown `model_id` too, as Livepeer's runner answers): "
                             "`detail.msg` names the field at fault."})


def _route(path: str):
    def decorate(func):
        router.post(path + "/", response_model=LivepeerImageResponse, responses=_ERRORS,
                    include_in_schema=False)(func)
        return router.post(path, response_model=LivepeerImageResponse, responses=_ERRORS)(func)
    return decorate


async def _answer(request: Request, service: ImagesService,
                  planning: Callable[[], Awaitable[GenerationPlan]]) -> Response:
    async def plan():  # converting the request may refuse it too (width without height)
        return await planning()

    try:
        return json_response(to_livepeer(await answer(request, service, plan())))
    except APIError as error:
        raise rename_param(error) from None


@_route("/text-to-image")
async def livepeer_text_to_image(request: Request, body: LivepeerTextToImageRequest,
                                 service: Service) -> Response:
    """Livepeer runner's text-to-image."""
    return await _answer(request, service, lambda: service.plan(asked_by(body.to_request(), request)))


@_route("/image-to-image")
async def livepeer_image_to_image(request: Request, form: Multipart[LivepeerImageToImageForm],
                                  service: Service) -> Response:
    """Livepeer runner's image-to-image."""
    return await _answer(request, service, lambda: service.plan(asked_by(form.to_request(), request), form.image))


@_route("/upscale")
async def livepeer_upscale(request: Request, form: Multipart[LivepeerUpscaleForm],
                           service: Service) -> Response:
    """Livepeer runner's upscale."""
    return await _answer(request, service, lambda: service.plan(asked_by(form.to_request(), request), form.image))
