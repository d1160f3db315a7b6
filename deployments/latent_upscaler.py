"""Stable Diffusion x2 latent upscaler (stabilityai/sd-x2-latent-upscaler).

Takes images, or latents straight from an SD text-to-image stage, so a generate -> x2
chain never decodes in between.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionLatentUpscalePipeline

from deployments.common import PipelineDeployment, generators, images_to_float, to_uint8
from deployments.errors import InvalidJobError


class LatentUpscalerDeployment(PipelineDeployment):
    """One StableDiffusionLatentUpscalePipeline per replica."""

    pipeline_cls = StableDiffusionLatentUpscalePipeline

    async def upscale(self, job, source):
        """Upscale ``source`` x2: uint8 images (H, W, 3) / (N, H, W, 3), or latents
        (N, 4, h, w). Returns uint8 (N, 2H', 2W', 3), H' and W' rounded down to 8."""
        return await self._run(self._upscale, job, source)

    def _upscale(self, job, source):
        count = len(job.seeds)
        if isinstance(source, torch.Tensor):
            if source.ndim != 4 or source.shape[0] != count or source.shape[1] != 4:
                raise InvalidJobError(f"expected latents (n={count}, 4, h, w), got {tuple(source.shape)}")
            image = source
        else:
            image = images_to_float(source, count)
        output = self.pipe(
            prompt=[job.prompt] * count,
            negative_prompt=[job.negative_prompt] * count if job.negative_prompt else None,
            image=image,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            generator=generators(job.seeds),
            output_type="np",
        ).images
        return to_uint8(output)
