"""Stable Diffusion x4 upscaler (stabilityai/stable-diffusion-x4-upscaler): text-guided
diffusion at the input's resolution, decoded at four times its size."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionUpscalePipeline

from deployments.common import PipelineDeployment, generators, images_to_float, to_uint8
from deployments.errors import InvalidJobError

DEFAULT_NOISE_LEVEL = 20


class X4UpscalerDeployment(PipelineDeployment):
    """One StableDiffusionUpscalePipeline per replica."""

    pipeline_cls = StableDiffusionUpscalePipeline

    async def upscale(self, job, source):
        """Upscale uint8 images (H, W, 3) / (N, H, W, 3) x4; returns uint8 (N, 4H, 4W, 3)."""
        if isinstance(source, torch.Tensor):
            raise InvalidJobError(f"{self.spec.name} upscales images, not latents", param="upscale")
        return await self._run(self._upscale, job, source)

    def _upscale(self, job, source):
        count = len(job.seeds)
        noise_level = DEFAULT_NOISE_LEVEL if job.noise_level is None else job.noise_level
        if noise_level > self.pipe.config.max_noise_level:
            raise InvalidJobError(
                f"noise_level must be at most {self.pipe.config.max_noise_level}", param="noise_level"
            )
        output = self.pipe(
            prompt=[job.prompt] * count,
            negative_prompt=[job.negative_prompt] * count if job.negative_prompt else None,
            image=images_to_float(source, count),
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            noise_level=noise_level,
            generator=generators(job.seeds),
            output_type="np",
        ).images
        return to_uint8(output)
