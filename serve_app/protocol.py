"""The wire format: request and response models and the error envelope.

Field names follow OpenAI's Images API; the extension fields (``seed``,
``negative_prompt``, ``guidance_scale``, ``num_inference_steps``, ``high_noise_frac``) follow
the services our users come from. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Annotated, ClassVar, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_N = 10
# torch generators take seeds below 2**64; image i of a request uses seed + i.
MAX_SEED = 2**63 - 1

_SIZE_RE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


def parse_size(size: str) -> tuple[int, int]:
    """Parse ``"WIDTHxHEIGHT"`` into ``(width, height)``; raise ``ValueError`` otherwise."""
    match = _SIZE_RE.match(size)
    if not match:
        raise ValueError(f"size must be 'WIDTHxHEIGHT', such as '512x512'; got {size!r}")
    return int(match.group(1)), int(match.group(2))


def _check_size(value: str | None) -> str | None:
    if value is not None and value != "auto":
        parse_size(value)
    return value


def _check_prompt(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt must not be blank")
    return value


_MODERATION = (
    "Safety-checker strictness: 'auto' applies the server's policy (flag, blur or reject); "
    "'low' checks and marks images but returns them as made. Ignored without a checker."
)
Moderation = Literal["auto", "low"]

# "WIDTHxHEIGHT" or "auto"; and a prompt that is not only whitespace.
SizeField = Annotated[str | None, AfterValidator(_check_size)]
PromptField = Annotated[str, AfterValidator(_check_prompt)]


class _Strict(BaseModel):
    """Unknown fields are an error: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ImageRequest:
    """A request as planning takes it, whichever route and wire shape it came in: each wire
    model converts itself (``to_request``), Livepeer's included. Uploads travel beside it,
    decoded."""

    task: Literal["generate", "edit", "variation", "upscale"]
    prompt: str = ""
    # Prompts for a model's further text encoders (SDXL's second), from Livepeer's
    # 'first | second' prompts; planning refuses them for a model with fewer encoders.
    more_prompts: tuple[str, ...] = ()
    more_negative_prompts: tuple[str, ...] = ()
    model: str | None = None
    n: int = 1
    size: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    high_noise_frac: float | None = None
    strength: float | None = None
    noise_level: int | None = None
    width: int | None = None
    height: int | None = None
    upscale: str | None = None
    stream: bool = False
    partial_images: int | None = None
    moderation: str = "auto"
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None


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
        return ImageRequest(task=self._task, **{name: value for name, value in self
                                                 if name in _REQUEST_FIELDS})


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


_SIZE_DESCRIPTION = "'WIDTHxHEIGHT', multiples of 8; default: the input's size rounded down to 8."


class _ImageForm(_ImageOptions):
    """Multipart fields shared by the image-input routes."""

    image: UploadFile = Field(description="PNG, JPEG or WebP image.")


class _EditFields(_ImageForm):
    size: SizeField = Field(default=None, description=_SIZE_DESCRIPTION)
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


class ImageData(BaseModel):
    """One generated image: ``b64_json`` or ``url``, as the request asked."""

    b64_json: str | None = None
    url: str | None = None
    seed: int
    nsfw: bool | None = Field(
        default=None, description="Set when a safety checker ran: true if it flagged the image."
    )


class ImagesUsage(BaseModel):
    """What a request cost: not OpenAI's token counts, which mean nothing for diffusion."""

    denoising_steps: int = Field(description="Denoising steps run, summed over images and stages.")
    output_pixels: int = Field(description="n x width x height of the returned images.")
    model_seconds: float = Field(
        description="Model replica time spent on the request (its share of shared batches)."
    )


class ImagesResponse(BaseModel):
    """Response of the images routes."""

    created: int
    data: list[ImageData]
    output_format: str
    size: str
    usage: ImagesUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    capabilities: list[str] = Field(
        default_factory=list,
        description="What the model does: text-to-image, image-to-image, inpaint, upscale, refine.",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope."""

    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok", "starting"]
    deployments: dict[str, str]
