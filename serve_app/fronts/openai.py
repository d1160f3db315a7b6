"""OpenAI's Images API on the wire: request bodies and forms, responses, the error envelope.

Field names follow OpenAI's Images API; the extension fields (``seed``,
``negative_prompt``, ``guidance_scale``, ``num_inference_steps``, ``high_noise_frac``, ``loras``)
follow the services our users come from. Each request model converts itself into the one
:class:`~serve_app.service.request.ImageRequest` (``to_request``). No torch, no Ray here.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, ClassVar, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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
    MAX_N,
    MAX_SEED,
    ImageRequest,
    Loras,
    LoraWeight,
    lora_set,
    lora_set_from_json,
    PromptField,
    SizeField,
)

# The responses are the service's own (serve_app/service/responses.py): OpenAI's shapes.
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

    model: str | None = Field(
        default=None, description="Served model name or alias; the configured default if omitted."
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
        description="Quality (0-100) for jpeg and webp; 100 keeps the most detail. Default 100.",
    )
    user: str | None = Field(default=None, description="End-user identifier, for the logs.")
    negative_prompt: str | None = Field(default=None, description="What the image should not show.")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Seed of image 0; image i uses seed + i. Drawn at random when omitted.",
    )
    guidance_scale: float | None = Field(
        default=None, ge=0, le=50, description="Classifier-free guidance scale."
    )
    num_inference_steps: int | None = Field(
        default=None, ge=1, description="Denoising steps (at most the model's limit)."
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
    stream: bool = Field(default=False, description="Answer with Server-Sent Events.")
    partial_images: int | None = Field(
        default=None, ge=0, le=3, description="With stream: previews sent during denoising (0-3)."
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
    upscale: str | None = Field(
        default=None,
        description="Upscaler model to run on every generated image (output size x factor).",
    )
    loras: Annotated[
        Loras | None, AfterValidator(_check_loras)
    ] = Field(default=None, description=_LORAS_DESCRIPTION + ": a map of name to weight, or "
              'a list of {"name", "weight"}.')


_SIZE_DESCRIPTION = "'WIDTHxHEIGHT', multiples of 8; default: the input's size rounded down to 8."


class _ImageForm(_ImageOptions):
    """Multipart fields shared by the image-input routes."""

    image: UploadFile = Field(description="PNG, JPEG or WebP image.")


class _EditFields(_ImageForm):
    size: SizeField = Field(default=None, description=_SIZE_DESCRIPTION)
    loras: Annotated[str | None, AfterValidator(_check_json_loras)] = Field(
        default=None, description=_LORAS_DESCRIPTION + ', as JSON text: {"ink": 0.8} or '
        '[{"name": "ink", "weight": 0.8}].')
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
        "(without an alpha channel: white marks it).",
    )
    upscale: str | None = Field(default=None, description="Upscaler to run on every result.")


class ImageVariationForm(_EditFields):
    """Multipart body of ``POST /v1/images/variations``: image to image without a prompt."""

    _task = "variation"


class UpscaleForm(_ImageForm):
    """Multipart body of ``POST /v1/images/upscale``."""

    _task = "upscale"
    prompt: str = Field(default="", description="Guides diffusion upscalers; esrgan ignores it.")
    noise_level: int | None = Field(default=None, ge=0, le=350, description="x4 upscaler only.")
    width: int | None = Field(default=None, ge=8, le=16384, description="Output width (keeps aspect).")
    height: int | None = Field(default=None, ge=8, le=16384, description="Output height (keeps aspect).")
