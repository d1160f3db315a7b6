"""Stable Diffusion x4 upscaler (stabilityai/stable-diffusion-x4-upscaler): text-guided
diffusion at the input's resolution, decoded at four times its size.

The pipeline's image processor cuts its input down to a multiple of the VAE's scale
factor (4 pixels): inputs are padded up to one instead (edge pixels repeated) and the
output cropped back to four times the input's size, so no pixel of the input is lost.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionUpscalePipeline

import numpy as np

from deployments.contract import unwrap
from deployments.runtime.arrays import (
    batch_text, crop, images_to_float, pad_images, padded_side, pixels_to_uint8, split,
)
from deployments.runtime.replica import PipelineDeployment
from deployments.errors import InvalidJobError

DEFAULT_NOISE_LEVEL = 20


class X4UpscalerDeployment(PipelineDeployment):
    """One StableDiffusionUpscalePipeline per replica."""

    pipeline_cls = StableDiffusionUpscalePipeline

    @property
    def image_multiple(self) -> int:
        """The multiple of the image sides the pipeline takes without cutting them down:
        its image processor's grid, the VAE's scale factor (4 for the real model). The UNet
        (plain down and up blocks) takes any size."""
        return self.pipe.image_processor.config.vae_scale_factor

    async def upscale(self, job, source):
        """Upscale uint8 images (H, W, 3) / (N, H, W, 3) x4; returns uint8 (N, 4H, 4W, 3)
        for any size (padded to the VAE's grid, the output cropped back)."""
        source, carried = unwrap(source)
        if isinstance(source, torch.Tensor):
            raise InvalidJobError(f"{self.spec.name} upscales images, not latents", param="upscale")
        noise_level = DEFAULT_NOISE_LEVEL if job.noise_level is None else job.noise_level
        # Guards for callers other than the ingress (the wire bounds noise_level): the
        # pipeline's own noise ceiling, and one image per seed, before the GPU call.
        if noise_level > self.pipe.config.max_noise_level:
            raise InvalidJobError(
                f"noise_level must be at most {self.pipe.config.max_noise_level}", param="noise_level"
            )
        if source.ndim == 4 and source.shape[0] != len(job.seeds):
            raise InvalidJobError(f"expected {len(job.seeds)} images, got {source.shape[0]}")
        # Keyed on the size as given: jobs batched together pad to one size and crop alike.
        key = (source.shape[-3:], job.num_inference_steps, job.guidance_scale, noise_level,
               job.negative_prompt is None)
        return await self._submit("upscale", job, (source,), key, carried)

    def _batch_upscale(self, entries):
        job = entries[0].job
        noise_level = DEFAULT_NOISE_LEVEL if job.noise_level is None else job.noise_level
        height, width = entries[0].inputs[0].shape[-3:-1]
        padded = (padded_side(height, self.image_multiple), padded_side(width, self.image_multiple))
        output = self.pipe(
            **batch_text(entries),
            image=np.concatenate([images_to_float(pad_images(e.inputs[0], *padded), e.images)
                                  for e in entries]),
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            noise_level=noise_level,
            output_type="pt",
            callback=self._legacy_step_callback(entries),
            callback_steps=1,
        ).images
        output = crop(pixels_to_uint8(output), self.upscale_factor * height, self.upscale_factor * width)
        return split(output, entries)
