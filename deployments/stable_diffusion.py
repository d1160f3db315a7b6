"""Stable Diffusion 2.1 (and other SD 1.x/2.x checkpoints): text to image."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from deployments.common import PipelineDeployment, TextToImageMixin
from deployments.errors import InvalidJobError


class StableDiffusionDeployment(TextToImageMixin, PipelineDeployment):
    """One StableDiffusionPipeline per replica."""

    pipeline_cls = StableDiffusionPipeline

    async def text_to_image(self, job):
        if job.denoising_end is not None:
            raise InvalidJobError(
                f"{self.spec.name} cannot hand latents to a refiner", param="high_noise_frac"
            )
        return await super().text_to_image(job)
