"""What the images service answers, in OpenAI's Images API shapes: the images response,
model cards, health, and the one error envelope. Other fronts convert from these
(Livepeer's routes: serve_app/fronts/livepeer.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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
    """``GET /health``: 200 with ``ok`` once every deployment has running replicas, else 503
    (``starting``; ``unknown`` when Serve's controller did not answer). ``deployments`` and
    ``failures`` only with API keys off, or for a caller that sends a valid key."""

    status: Literal["ok", "starting", "unknown"]
    # deployment -> Serve's status (HEALTHY, UNHEALTHY, ...)
    deployments: dict[str, str] | None = None
    # Deployments whose replicas fail to start, each with the error they fail with.
    failures: dict[str, str] | None = None
