"""The wire format: request and response models and the error envelope.

Field names follow OpenAI's Images API; the extension fields (``seed``,
``negative_prompt``, ``guidance_scale``, ``num_inference_steps``, ``high_noise_frac``) follow
the services our users come from. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_N = 10
# A LoRA adapter's weight (its scale): 0 leaves the model as it is, 1 is the adapter as
# trained, negative values push away from it.
LORA_WEIGHT_MIN, LORA_WEIGHT_MAX = -2.0, 2.0
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


LoraSet = tuple[tuple[str, float | None], ...]


def normalize_loras(value: Any) -> LoraSet:
    """``loras`` as ``((name, weight or None), ...)``: from a map of name to weight, a list
    of ``{"name", "weight"}`` (weight optional: the adapter's default), or either as JSON
    text (multipart forms, Livepeer). Raises ValueError on anything else."""
    if value is None:
        return ()
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                'loras must be a JSON map of adapter to weight, such as {"ink": 0.8}, or a '
                'list such as [{"name": "ink", "weight": 0.8}]'
            ) from None
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for entry in value:
            if isinstance(entry, BaseModel):
                entry = entry.model_dump()
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or set(entry) - {"name", "weight"}:
                raise ValueError('each loras entry must be {"name": ..., "weight": ...}')
            items.append((entry["name"], entry.get("weight")))
    else:
        raise ValueError('loras must be a map of adapter to weight, or a list of {"name", "weight"}')
    result = []
    for name, weight in items:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("a loras name must be a non-empty string")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"the weight of {name!r} must be a number")
            if not LORA_WEIGHT_MIN <= weight <= LORA_WEIGHT_MAX:
                raise ValueError(
                    f"the weight of {name!r} is {weight}; weights are from {LORA_WEIGHT_MIN} "
                    f"to {LORA_WEIGHT_MAX}"
                )
            weight = float(weight)
        result.append((name, weight))
    names = [name for name, _ in result]
    if len(set(names)) != len(names):
        raise ValueError("loras names the same adapter twice")
    return tuple(result)


def _check_loras(value: Any) -> Any:
    normalize_loras(value)
    return value


_LORAS_DESCRIPTION = (
    "LoRA adapters of the model (GET /v1/models/{model} lists them) and their weights "
    f"({LORA_WEIGHT_MIN} to {LORA_WEIGHT_MAX}; omitted: the adapter's default)"
)


class LoraWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Adapter name.")
    weight: float | None = Field(default=None, description="Its weight; omitted: its default.")


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
    loras: LoraSet = ()
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
        values = {name: value for name, value in self if name in _REQUEST_FIELDS}
        if "loras" in values:
            values["loras"] = normalize_loras(values["loras"])
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
        dict[str, float] | list[LoraWeight] | None, AfterValidator(_check_loras)
    ] = Field(default=None, description=_LORAS_DESCRIPTION + ": a map of name to weight, or "
              'a list of {"name", "weight"}.')


_SIZE_DESCRIPTION = "'WIDTHxHEIGHT', multiples of 8; default: the input's size rounded down to 8."


class _ImageForm(_ImageOptions):
    """Multipart fields shared by the image-input routes."""

    image: UploadFile = Field(description="PNG, JPEG or WebP image.")


class _EditFields(_ImageForm):
    size: SizeField = Field(default=None, description=_SIZE_DESCRIPTION)
    loras: Annotated[str | None, AfterValidator(_check_loras)] = Field(
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


class LoraCard(BaseModel):
    name: str
    default_weight: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    capabilities: list[str] = Field(
        default_factory=list,
        description="What the model does: text-to-image, image-to-image, inpaint, upscale, refine.",
    )
    loras: list[LoraCard] | None = Field(
        default=None, description="LoRA adapters a request may name (models that take them)."
    )
    allow_hub_loras: bool | None = Field(
        default=None, description="Whether a request may name any Hub LoRA by its id."
    )
    max_loras_per_request: int | None = None


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
    """``GET /health``: 200 with ``ok`` once every deployment has running replicas, else 503."""

    status: Literal["ok", "starting"]
    deployments: dict[str, str]  # deployment -> Serve's status (HEALTHY, UNHEALTHY, ...)
    # Deployments whose replicas fail to start, each with the error they fail with.
    failures: dict[str, str] = {}
