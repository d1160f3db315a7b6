"""What the ingress sends to model deployments: load specs and typed jobs.

Plain dataclasses without torch, so that the ingress can build them without importing
any model code. Images travel as uint8 numpy arrays (N, H, W, 3) or (H, W, 3); latents
(from a stage with ``output_latents``) as CPU tensors (N, 4, h, w) that the ingress never
touches.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class PipelineSpec:
    """How a deployment loads its pipeline."""

    name: str
    family: str
    source: str
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float16"
    cpu_dtype: str = "float32"
    cpu_offload: bool = False
    compile: bool = False
    cpu_threads: int | None = None
    max_batch_images: int = 8
    batch_wait_timeout_s: float = 0.0
    preview_decoder: str | None = None  # a tiny autoencoder for stream previews
    vae: str | None = None  # a replacement VAE (same latent space)
    vae_tiling: bool = False
    vae_slicing: bool = False


@dataclass(frozen=True)
class TextToImageJob:
    """Generate ``len(seeds)`` images of one prompt; image i starts from ``seeds[i]``.

    ``denoising_end`` stops early (the first half of a base -> refiner chain);
    ``output_latents`` returns latents instead of decoded images.
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    denoising_end: float | None = None
    output_latents: bool = False


@dataclass(frozen=True)
class ImageToImageJob:
    """Edit one input image ``len(seeds)`` times (the image and an optional mask are
    passed beside the job, already at ``width`` x ``height``)."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    strength: float
    seeds: tuple[int, ...]
    output_latents: bool = False


@dataclass(frozen=True)
class RefineJob:
    """Finish denoising latents from ``denoising_start`` on and decode them to images."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    denoising_start: float
    output_latents: bool = False


@dataclass(frozen=True)
class UpscaleJob:
    """Upscale one image (repeated ``len(seeds)`` times) or a batch of ``len(seeds)``
    images or latents by the model's factor. Diffusion upscalers use the prompt, steps,
    guidance and seeds; ESRGAN ignores them."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    noise_level: int | None = None


@dataclass(frozen=True)
class SafetyJob:
    """Check a stage's images with the safety checker; ``blur`` blurs the flagged ones."""

    blur: bool = False
