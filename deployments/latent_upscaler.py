"""Stable Diffusion x2 latent upscaler (stabilityai/sd-x2-latent-upscaler).

Takes images, or latents straight from an SD text-to-image stage, so a generate -> x2
chain never decodes in between.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionLatentUpscalePipeline

import numpy as np

from deployments.contract import unwrap
from deployments.arrays import batch_text, images_to_float, split, to_uint8
from deployments.replica import PipelineDeployment
from deployments.errors import InvalidJobError


class LatentUpscalerDeployment(PipelineDeployment):
    """One StableDiffusionLatentUpscalePipeline per replica."""

    pipeline_cls = StableDiffusionLatentUpscalePipeline

    async def upscale(self, job, source):
        """Upscale ``source`` x2: uint8 images (H, W, 3) / (N, H, W, 3), or latents
        (N, 4, h, w). Returns uint8 (N, 2H', 2W', 3), H' and W' rounded down to 8."""
        source, carried = unwrap(source)
        count = len(job.seeds)
        if isinstance(source, torch.Tensor):
            self.check_latents(source, carried)
            if source.ndim != 4 or source.shape[0] != count or source.shape[1] != 4:
                raise InvalidJobError(f"expected latents (n={count}, 4, h, w), got {tuple(source.shape)}")
            shape = ("latents", *source.shape[1:])
        else:
            images_to_float(source[:1] if source.ndim == 4 else source, 1)  # checks the layout
            if source.ndim == 4 and source.shape[0] != count:
                raise InvalidJobError(f"expected {count} images, got {source.shape[0]}")
            shape = ("image", *source.shape[-3:])
        key = (shape, job.num_inference_steps, job.guidance_scale, job.negative_prompt is None)
        return await self._submit("upscale", job, (source,), key, carried)

    def _batch_upscale(self, entries):
        job = entries[0].job
        if isinstance(entries[0].inputs[0], torch.Tensor):
            image = torch.cat([entry.inputs[0] for entry in entries])
        else:
            image = np.concatenate([images_to_float(e.inputs[0], e.images) for e in entries])
        output = self.pipe(
            **batch_text(entries),
            image=image,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            output_type="np",
            callback=self._legacy_step_callback(entries),
            callback_steps=1,
        ).images
        return split(to_uint8(output), entries)
