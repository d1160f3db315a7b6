"""The request bodies more than one front takes: OpenAI's images bodies and forms, which
the OpenAI routes (fronts/openai.py) and the asynchronous jobs (fronts/jobs.py) both accept.
Shared by the fronts, it imports none of them, so each front stands alone.

Field names follow OpenAI's Images API; the extension fields (``seed``, ``negative_prompt``,
``guidance_scale``, ``num_inference_steps``, ``high_noise_frac``, ``loras``) follow the services
our users come from. Every bound is the table's (serve_app/protocol/request.py). Each body
converts itself into the one :class:`~serve_app.protocol.request.ImageRequest`
(``to_request``). No torch, no Ray here.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, ClassVar, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from serve_app.fronts.openapi import LORAS_JSON_SCHEMA, UPLOAD_LIMITS, form_schema, request_schema, upload_schema
from serve_app.protocol.request import (
    LORA_WEIGHT_MAX,
    LORA_WEIGHT_MIN,
    MAX_LORAS_JSON_CHARS,
    MAX_PARTIAL_IMAGES,
    Compression,
    Guidance,
    HighNoiseFrac,
    ImageCount,
    ImageRequest,
    Loras,
    LoraWeight,
    NameField,
    NoiseLevel,
    PartialImages,
    PromptField,
    Seed,
    Side,
    SizeField,
    Steps,
    Strength,
    TextField,
    lora_set,
    lora_set_from_json,
)

# The bodies' schema names LoraWeight.
__all__ = ["ImageEditForm", "ImageGenerationRequest", "ImageVariationForm", "LoraWeight", "UpscaleForm"]


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
    n: ImageCount = Field(default=1, description="Number of images.")
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json",
        description="How images are returned: base64 in 'b64_json', or a download link in 'url'.",
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        default="png", description="Encoding of the returned images."
    )
    output_compression: Compression | None = Field(
        default=None,
        description="Quality (0-100) for jpeg and webp (not png); 100 keeps the most detail. "
        "Default 100.",
    )
    user: NameField | None = Field(default=None, description="End-user identifier, for the logs.")
    negative_prompt: TextField | None = Field(default=None, description="What the image should not show.")
    seed: Seed | None = Field(
        default=None,
        description="Seed of image 0; image i uses seed + i. Drawn at random when omitted.",
    )
    guidance_scale: Guidance | None = Field(
        default=None, description="Classifier-free guidance scale."
    )
    num_inference_steps: Steps | None = Field(
        default=None,
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
    partial_images: PartialImages | None = Field(
        default=None,
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
    high_noise_frac: HighNoiseFrac | None = Field(
        default=None,
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
    strength: Strength | None = Field(
        default=None, description="How far to move from the input (0 < s <= 1)."
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
    noise_level: NoiseLevel | None = Field(default=None, description="x4 upscaler only.")
    width: Side | None = Field(
        default=None,
        description="Output width (the height keeps the aspect ratio); not with height. The "
        "output is at most the upscaler's `limits.max_output_pixels`.")
    height: Side | None = Field(
        default=None,
        description="Output height (the width keeps the aspect ratio); not with width. The "
        "output is at most the upscaler's `limits.max_output_pixels`.")
