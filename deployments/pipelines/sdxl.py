"""Stable Diffusion XL: the base model (text to image or to latents) and the refiner.

Together they form the ensemble of experts: the base denoises the high-noise share of
the schedule and returns latents, the refiner finishes the low-noise share and decodes.
"""

from __future__ import annotations

from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

import torch

from deployments.runtime.arrays import batch_text, finish, split
from deployments.runtime.replica import ImageToImageMixin, PipelineDeployment, TextToImageMixin
from deployments.contract import unwrap
from deployments.errors import InvalidJobError


class SDXLBaseDeployment(TextToImageMixin, ImageToImageMixin, PipelineDeployment):
    """One StableDiffusionXLPipeline per replica, plus img2img/inpaint views of it."""

    pipeline_cls = StableDiffusionXLPipeline
    img2img_cls = StableDiffusionXLImg2ImgPipeline
    inpaint_cls = StableDiffusionXLInpaintPipeline

    def __init__(self, spec):
        super().__init__(spec)
        self._init_image_pipelines()


class SDXLRefinerDeployment(PipelineDeployment):
    """One StableDiffusionXLImg2ImgPipeline (the refiner) per replica."""

    pipeline_cls = StableDiffusionXLImg2ImgPipeline

    async def refine(self, job, latents):
        """Finish ``latents`` (N, 4, h, w) from ``job.denoising_start`` and decode them.

        ``latents`` is normally the base deployment's result, handed over as an
        :class:`~deployments.contract.Upstream` that :meth:`run` fetched from the base
        replica (never through the ingress); a :class:`StageResult` carries its cost so far.
        """
        latents, carried = unwrap(latents)
        self.check_latents(latents, carried)
        # A guard for callers other than the ingress: one latent per seed, before the GPU call.
        if latents.ndim != 4 or latents.shape[0] != len(job.seeds):
            raise InvalidJobError(
                f"expected latents for {len(job.seeds)} images, got shape {tuple(latents.shape)}"
            )
        key = (job.num_inference_steps, job.guidance_scale, job.denoising_start,
               job.output_latents, tuple(latents.shape[1:]), job.negative_prompt is None)
        return await self._submit("refine", job, (latents,), key, carried)

    def _batch_refine(self, entries):
        job = entries[0].job
        output = self._pipeline()(
            **batch_text(entries),
            image=torch.cat([entry.inputs[0] for entry in entries]),
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            denoising_start=job.denoising_start,
            output_type="latent" if job.output_latents else "pt",
            callback_on_step_end=self._step_callback(entries),
        ).images
        return split(finish(output, job.output_latents), entries)
