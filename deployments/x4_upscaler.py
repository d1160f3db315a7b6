"""Stable Diffusion x4 upscaler (stabilityai/stable-diffusion-x4-upscaler): text-guided
diffusion at the input's resolution, decoded at four times its size."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionUpscalePipeline

import numpy as np

from deployments.contract import unwrap
from deployments.arrays import batch_text, images_to_float, split, to_uint8
from deployments.replica import PipelineDeployment
from deployments.errors import InvalidJobError

DEFAULT_NOISE_LEVEL = 20


class X4UpscalerDeployment(PipelineDeployment):
    """One StableDiffusionUpscalePipeline per replica."""

    pipeline_cls = StableDiffusionUpscalePipeline

    async def upscale(self, job, source):
        """Upscale uint8 images (H, W, 3) / (N, H, W, 3) x4; returns uint8 (N, 4H, 4W, 3)."""
        source, carried = unwrap(source)
        if isinstance(source, torch.Tensor):
            raise InvalidJobError(f"{self.spec.name} upscales images, not latents", param="upscale")
        noise_level = DEFAULT_NOISE_LEVEL if job.noise_level is None else job.noise_level
        if noise_level > self.pipe.config.max_noise_level:
            raise InvalidJobError(
                f"noise_level must be at most {self.pipe.config.max_noise_level}", param="noise_level"
            )
        if source.ndim == 4 and source.shape[0] != len(job.seeds):
            raise InvalidJobError(f"expected {len(job.seeds)} images, got {source.shape[0]}")
        key = (source.shape[-3:], job.num_inference_steps, job.guidance_scale, noise_level,
               job.negative_prompt is None)
        return await self._submit("upscale", job, (source,), key, carried)

    def _batch_upscale(self, entries):
        job = entries[0].job
        noise_level = DEFAULT_NOISE_LEVEL if job.noise_level is None else job.noise_level
        output = self.pipe(
            **batch_text(entries),
            image=np.concatenate([images_to_float(e.inputs[0], e.images) for e in entries]),
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            noise_level=noise_level,
            output_type="np",
            callback=self._legacy_step_callback(entries),
            callback_steps=1,
        ).images
        return split(to_uint8(output), entries)
