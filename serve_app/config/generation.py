"""What a request gets when it leaves a field out, and what it may ask of a model.

The size rules themselves are serve_app/protocol/sizes.py's, shared with planning; these
sections hold a model's numbers and check them when the config is read.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from serve_app.config.base import Strict
from serve_app.protocol import sizes as size_rules
from serve_app.protocol.request import MAX_N, MAX_STEPS
from serve_app.protocol.sizes import parse_size


class GenerationDefaults(Strict):
    """Values used when a request leaves a field out."""

    num_inference_steps: int = Field(ge=1, description="Denoising steps.")
    guidance_scale: float = Field(ge=0, description="Classifier-free guidance scale.")
    size: str | None = Field(
        default=None, description="'WIDTHxHEIGHT' of text-to-image output when the request has none."
    )
    negative_prompt: str | None = Field(default=None, description="Negative prompt by default.")
    high_noise_frac: float | None = Field(
        default=None, gt=0, lt=1, description="Refiner chains: share of steps run by the base."
    )
    strength: float = Field(
        default=0.75, gt=0, le=1,
        description="Image-to-image edits and variations: how far to move from the input "
        "(inpainting defaults to 1.0).",
    )
    noise_level: int | None = Field(
        default=None, ge=0, le=350, description="x4 upscaler: noise added to the input (20)."
    )

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value


class GenerationLimits(Strict):
    """What a request may ask of a model."""

    max_n: int = Field(default=MAX_N, ge=1, le=MAX_N, description="Most images per request.")
    max_steps: int = Field(
        ge=1,
        le=MAX_STEPS,
        description="Most denoising steps a request runs (image-to-image runs "
        "num_inference_steps x strength of them), and the most num_inference_steps of a "
        "text-to-image or upscale request.",
    )
    max_schedule_steps: int | None = Field(
        default=None,
        ge=1,
        le=MAX_STEPS,
        description="Image-to-image (edits, variations, inpainting): the most "
        "num_inference_steps, whatever the strength (the schedule's length: the scheduler "
        "sets up every one of its timesteps, however few of them run). Default: 4 x max_steps, "
        "at most the timesteps the model's scheduler was trained on (1000).",
    )
    sizes: list[str] = Field(
        default_factory=list,
        description="Text-to-image sizes allowed by name ('WIDTHxHEIGHT', multiples of 8), "
        "besides any within min_side and max_pixels.",
    )
    min_side: int = Field(
        default=64,
        ge=8,
        description="Text-to-image sizes within max_pixels: smallest width or height.",
    )
    min_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Text-to-image sizes within the bounds: fewest pixels (SDXL does well "
        "around one megapixel, not far below).",
    )
    max_pixels: int | None = Field(
        default=None,
        ge=64,
        description="Text-to-image: any WIDTHxHEIGHT in multiples of 8 with both sides at "
        "least min_side and at most this many pixels is allowed, besides `sizes`. Edits: "
        "most output pixels (default: the largest of `sizes`).",
    )
    max_input_pixels: int | None = Field(
        default=None, ge=1,
        description="Upscalers: most pixels (width x height) of an input image. Edits and "
        "variations with a size: most pixels of the uploaded image, which is resized to that "
        "size (default: ingress.max_upload_pixels; without a size the output is the input's "
        "size, held to the output limits).",
    )
    max_output_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Upscalers: most output pixels when width or height is asked for "
        "(default: max_input_pixels x factor^2).",
    )
    min_input_side: int | None = Field(
        default=None,
        ge=1,
        description="Edits and upscalers: smallest input width or height (default: the "
        "smallest the model takes, from the family registry).",
    )

    # The rules themselves are serve_app/protocol/sizes.py's, shared with planning.
    @property
    def output_pixels(self) -> int:
        """Largest allowed output area: max_pixels, or the largest of the named sizes."""
        return size_rules.output_pixels(self)

    def allows(self, width: int, height: int) -> bool:
        """Whether text-to-image may make ``width`` x ``height``."""
        return size_rules.allows(self, width, height)

    def describe_sizes(self) -> str:
        """The allowed sizes, in words, for error messages."""
        return size_rules.describe_sizes(self)

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            width, height = parse_size(size)
            if width % 8 or height % 8:
                raise ValueError(f"size {size!r}: width and height must be multiples of 8")
        return value

    @model_validator(mode="after")
    def _check_bounds(self):
        if self.max_pixels is not None and self.min_side * self.min_side > self.max_pixels:
            raise ValueError(
                f"min_side {self.min_side} squared is over max_pixels {self.max_pixels}: "
                "no size would be allowed"
            )
        if self.min_pixels is not None and (
            self.max_pixels is None or self.min_pixels > self.max_pixels
        ):
            raise ValueError("min_pixels needs max_pixels, and must be at most max_pixels")
        if self.max_schedule_steps is not None and self.max_schedule_steps < self.max_steps:
            raise ValueError(f"max_schedule_steps ({self.max_schedule_steps}) must be at least "
                             f"max_steps ({self.max_steps})")
        return self
