"""Livepeer-compatible routes: Livepeer's runner field names over our request planning.

``POST /text-to-image`` (JSON), ``POST /image-to-image`` and ``POST /upscale`` (multipart)
take the fields of Livepeer's ai-runner and answer ``{"images": [{"url": "data:...",
"seed": ..., "nsfw": ...}]}``. Each adapter converts itself into the internal
:class:`~serve_app.protocol.ImageRequest`, as the OpenAI-shaped models do, and errors are
renamed back, so they name the field the client sent.
"""

from __future__ import annotations

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import APIError, InvalidRequestError
from serve_app.protocol import MAX_N, MAX_SEED, ImageRequest, ImagesResponse, PromptField

# Our field -> Livepeer's, for error messages.
_PARAMS = {"model": "model_id", "n": "num_images_per_prompt", "size": "width",
           "moderation": "safety_check"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _LivepeerCommon(_Strict):
    model_id: str | None = Field(default=None, description="Served model name or Hub id.")
    safety_check: bool = Field(
        default=True,
        description="With a safety checker configured: true applies the server's policy "
        "(moderation 'auto'), false only marks flagged images (moderation 'low'). Without "
        "one, every image reports nsfw: false.",
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(default=None, ge=1)

    @property
    def moderation(self) -> str:
        return "auto" if self.safety_check else "low"


class LivepeerTextToImageRequest(_LivepeerCommon):
    """JSON body of ``POST /text-to-image``."""

    prompt: PromptField = Field(min_length=1)
    negative_prompt: str | None = None
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    width: int | None = Field(default=None, ge=8, le=16384)
    height: int | None = Field(default=None, ge=8, le=16384)
    num_images_per_prompt: int = Field(default=1, ge=1, le=MAX_N)

    def to_request(self) -> ImageRequest:
        if (self.width is None) != (self.height is None):
            missing = "height" if self.height is None else "width"
            raise InvalidRequestError("give both width and height, or neither", param=missing)
        size = f"{self.width}x{self.height}" if self.width is not None else None
        return ImageRequest(
            task="generate",
            moderation=self.moderation,
            prompt=self.prompt,
            model=self.model_id or None,
            n=self.num_images_per_prompt,
            size=size,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps,
        )


class LivepeerImageToImageForm(_LivepeerCommon):
    """Multipart body of ``POST /image-to-image``."""

    image: UploadFile
    prompt: PromptField = Field(min_length=1)
    negative_prompt: str | None = None
    strength: float | None = Field(default=None, gt=0, le=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    num_images_per_prompt: int = Field(default=1, ge=1, le=MAX_N)

    def to_request(self) -> ImageRequest:
        return ImageRequest(
            task="edit",
            moderation=self.moderation,
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

    image: UploadFile
    prompt: str = Field(default="")

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
