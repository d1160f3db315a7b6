"""What the ingress sends to model deployments: load specs and typed jobs.

Plain dataclasses without torch, so that the ingress can build them without importing
any model code.
"""

from __future__ import annotations

from dataclasses import dataclass

# What each pipeline family can do on its own.
FAMILY_CAPABILITIES: dict[str, frozenset[str]] = {
    "sd21": frozenset({"text-to-image"}),
    "sdxl": frozenset({"text-to-image"}),
    # The refiner continues a base model's latents; it does not start from text alone.
    "sdxl-refiner": frozenset({"refine"}),
}


@dataclass(frozen=True)
class PipelineSpec:
    """How a deployment loads its pipeline."""

    name: str
    family: str
    source: str
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float16"
    cpu_offload: bool = False
    compile: bool = False


@dataclass(frozen=True)
class TextToImageJob:
    """Generate ``len(seeds)`` images of one prompt; image i starts from ``seeds[i]``.

    With ``denoising_end`` set, denoising stops at that fraction and the latents are
    returned instead of images (the first half of a base -> refiner chain).
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    denoising_end: float | None = None


@dataclass(frozen=True)
class RefineJob:
    """Finish denoising latents from ``denoising_start`` on and decode them to images."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    denoising_start: float
