"""OpenAI's Images API on the wire: request bodies and forms, responses, the error envelope.

Field names follow OpenAI's Images API; the extension fields (``seed``,
``negative_prompt``, ``guidance_scale``, ``num_inference_steps``, ``high_noise_frac``, ``loras``)
follow the services our users come from. Each request model converts itself into the one
:class:`~serve_app.service.request.ImageRequest` (``to_request``). No torch, no Ray here.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, ClassVar, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

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


# --- what the OpenAPI document says a valid request is -----------------------------------
# Upload decoding is serve_app/service/uploads.py's: these are the formats it opens (it
# reads an upload by its content, not by its file name or its part's Content-Type).
IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg", "image/webp")
# What service/request.py's parse_size takes; edits also want multiples of 8 (the
# description says so) and every model its own bounds, which no pattern can know.
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
# A prompt that is not only whitespace (service/request.py's PromptField).
PROMPT_PATTERN = r"\S"

UPLOAD_LIMITS = (
    "The ingress reads it by its content (not its file name or part Content-Type) and refuses, "
    "with a 400 naming the field, an empty, truncated or undecodable file and one of more than "
    "`ingress.max_upload_pixels` pixels (default 4096x4096 = 16777216). Each side must be at "
    "least the model's `limits.min_input_side` (by default its family's: 64 for SD 2.1 and "
    "SDXL, 8 for the upscalers), and an upscaler takes at most its "
    "`limits.max_input_pixels`. The whole request body is at most `ingress.max_upload_bytes` "
    "bytes (a 413 past it): this field's maxLength."
)


def upload_schema(schema: dict[str, Any]) -> None:
    """An upload's JSON schema: binary (OpenAPI 3.0's ``format`` beside 3.1's
    ``contentMediaType``), not empty. The image types of its part are the requestBody's
    ``encoding`` and its ``maxLength`` the configured byte limit: the ingress's OpenAPI
    document adds both, per app."""
    schema.update(format="binary", contentMediaType="application/octet-stream", minLength=1)


def _present(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A condition: ``name`` is given (not left out, not null)."""
    return {"required": [name], "properties": {name: schema}}


def request_schema(schema: dict[str, Any]) -> None:
    """The JSON schema of an images request: the rules between its fields that no field's
    own schema can say (planning refuses a request that breaks one, whatever the model).
    ``output_compression`` is for jpeg and webp (png, the default, has no quality);
    ``partial_images`` needs ``stream``; a stream is one image of one model (no upscale)."""
    fields = schema.get("properties", {})
    rules = []
    if "output_compression" in fields:
        rules.append({"if": _present("output_compression", {"type": "integer"}),
                      "then": _present("output_format", {"enum": ["jpeg", "webp"]})})
    if "stream" in fields:
        rules.append({"if": _present("partial_images", {"type": "integer"}),
                      "then": _present("stream", {"const": True})})
        one = {"n": {"const": 1}} | ({"upscale": {"type": "null"}} if "upscale" in fields else {})
        rules.append({"if": _present("stream", {"const": True}), "then": {"properties": one}})
    if rules:
        schema["allOf"] = schema.get("allOf", []) + rules


def form_schema(schema: dict[str, Any]) -> None:
    """A multipart form's JSON schema: an optional field is left out, never sent as null (a
    form part is text, and ``null`` is no value of it), so the ``null`` branches (and the
    null defaults, which leaving the field out means) go.

    The rules between fields stay in the fields' descriptions, not in the schema: beside a
    binary part, schemathesis (4.32) checks ``allOf``, ``if`` and ``not`` with a validator
    that cannot read the part's bytes, and its negative cases fail to generate."""
    for field in schema.get("properties", {}).values():
        branches = field.get("anyOf")
        if not branches or {"type": "null"} not in branches:
            continue
        rest = [branch for branch in branches if branch != {"type": "null"}]
        del field["anyOf"]
        if "default" in field and field["default"] is None:
            del field["default"]
        if len(rest) == 1:
            field.update({key: value for key, value in rest[0].items() if key not in field})
        else:
            field["anyOf"] = rest


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references replaced by the definitions themselves."""
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


# ``loras`` of a form or of Livepeer's runner: JSON text of this shape.
LORAS_JSON_SCHEMA = {"contentMediaType": "application/json",
                     "contentSchema": _inline_defs(TypeAdapter(Loras).json_schema())}

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

    model: str | None = Field(
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
    stream: bool = Field(
        default=False,
        description="Answer with Server-Sent Events: one image (n 1) of one model (no refiner "
        "chain, no upscale).",
    )
    partial_images: int | None = Field(
        default=None, ge=0, le=3, description="With stream: previews sent during denoising (0-3)."
    )


class ImageGenerationRequest(_Streaming, _ImageOptions):
    """Body of ``POST /v1/images/generations``."""

    _task = "generate"
    prompt: PromptField = Field(min_length=1, description="Text description of the desired image(s).",
                                json_schema_extra={"pattern": PROMPT_PATTERN})
    size: SizeField = Field(
        default=None,
        description="'WIDTHxHEIGHT' (one of the model's allowed sizes) or 'auto' for its default.",
        json_schema_extra={"pattern": SIZE_PATTERN},
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


_SIZE_DESCRIPTION = (
    "'WIDTHxHEIGHT' or 'auto': multiples of 8, each side at least the model's "
    "`limits.min_input_side`, at most its output pixels (`limits.max_pixels`, or the largest of "
    "`limits.sizes`); default: the input's size rounded down to multiples of 8."
)


class _ImageForm(_ImageOptions):
    """Multipart fields shared by the image-input routes."""

    model_config = ConfigDict(json_schema_extra=form_schema)

    image: UploadFile = Field(description="PNG, JPEG or WebP image. " + UPLOAD_LIMITS,
                              json_schema_extra=upload_schema)


class _EditFields(_ImageForm):
    size: SizeField = Field(default=None, description=_SIZE_DESCRIPTION,
                            json_schema_extra={"pattern": SIZE_PATTERN, "examples": ["auto"]})
    loras: Annotated[str | None, AfterValidator(_check_json_loras)] = Field(
        default=None, description=_LORAS_DESCRIPTION + ', as JSON text: {"ink": 0.8} or '
        '[{"name": "ink", "weight": 0.8}].', json_schema_extra=LORAS_JSON_SCHEMA)
    strength: float | None = Field(
        default=None, gt=0, le=1, description="How far to move from the input (0 < s <= 1)."
    )


class ImageEditForm(_Streaming, _EditFields):
    """Multipart body of ``POST /v1/images/edits``."""

    _task = "edit"
    prompt: PromptField = Field(min_length=1, description="What the edited image should show.",
                                json_schema_extra={"pattern": PROMPT_PATTERN})
    mask: UploadFile | None = Field(
        default=None,
        description="Same size as image; fully transparent pixels mark the area to repaint "
        "(without an alpha channel: white marks it). PNG, JPEG or WebP, as image; an alpha "
        "channel without a transparent pixel is refused (nothing to edit).",
        json_schema_extra=upload_schema,
    )
    upscale: str | None = Field(
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
    prompt: str = Field(default="", description="Guides diffusion upscalers; esrgan ignores it.")
    noise_level: int | None = Field(default=None, ge=0, le=350, description="x4 upscaler only.")
    width: int | None = Field(
        default=None, ge=8, le=16384,
        description="Output width (the height keeps the aspect ratio); not with height. The "
        "output is at most the upscaler's `limits.max_output_pixels`.")
    height: int | None = Field(
        default=None, ge=8, le=16384,
        description="Output height (the width keeps the aspect ratio); not with width. The "
        "output is at most the upscaler's `limits.max_output_pixels`.")
