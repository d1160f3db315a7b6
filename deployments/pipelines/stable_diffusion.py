"""Stable Diffusion 2.1 (and other SD 1.x/2.x checkpoints): text to image, image to image
and inpainting on one set of weights."""

from __future__ import annotations

from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from deployments.runtime.replica import ImageToImageMixin, PipelineDeployment, TextToImageMixin
from deployments.errors import InvalidJobError


class StableDiffusionDeployment(TextToImageMixin, ImageToImageMixin, PipelineDeployment):
    """One StableDiffusionPipeline per replica, plus img2img/inpaint views of it."""

    pipeline_cls = StableDiffusionPipeline
    img2img_cls = StableDiffusionImg2ImgPipeline
    inpaint_cls = StableDiffusionInpaintPipeline

    def __init__(self, spec):
        super().__init__(spec)
        self._init_image_pipelines()

    async def text_to_image(self, job):
        if job.denoising_end is not None:  # a guard for callers other than the ingress
            raise InvalidJobError(
                f"{self.spec.name} cannot hand latents to a refiner", param="high_noise_frac"
            )
        return await super().text_to_image(job)
