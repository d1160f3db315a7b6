"""Stable Diffusion x2 latent upscaler (stabilityai/sd-x2-latent-upscaler).

Takes images, or latents straight from an SD text-to-image stage, so a generate -> x2
chain never decodes in between.

Its UNet (K-diffusion blocks) runs at twice the latents' size and only takes sizes its
blocks halve and double exactly, with at least two pixels at the lowest level: inputs are
padded up to such a size (edge pixels, or edge latents, repeated) and the output cropped
back to twice the input's size.
"""

from __future__ import annotations

import math

import torch
from diffusers import StableDiffusionLatentUpscalePipeline

import numpy as np

from deployments.contract import unwrap
from deployments.runtime.arrays import (
    batch_text, crop, images_to_float, pad_images, pad_latents, padded_side, pixels_to_uint8, split,
)
from deployments.runtime.replica import PipelineDeployment
from deployments.errors import InvalidJobError

# The K-blocks' down- and upsamplers reflect-pad their input by one pixel, which takes at
# least two: the UNet's lowest level must be two pixels a side or more.
LOWEST_LEVEL_MIN_SIDE = 2


def latent_grid(down_block_types, unet_scale: int) -> tuple[int, int]:
    """(multiple, floor) of the latent sides a K-block UNet of ``down_block_types`` takes
    when it runs at ``unet_scale`` times the latents' size.

    Every down block but the last halves the size and the up blocks double it back, with no
    rounding: the UNet's input must be a multiple of 2^(blocks - 1), and at least
    LOWEST_LEVEL_MIN_SIDE times that.
    """
    unet_multiple = 2 ** (len(down_block_types) - 1)
    multiple = unet_multiple // math.gcd(unet_multiple, unet_scale)
    floor = -(-LOWEST_LEVEL_MIN_SIDE * unet_multiple // unet_scale)
    return multiple, floor


class LatentUpscalerDeployment(PipelineDeployment):
    """One StableDiffusionLatentUpscalePipeline per replica."""

    pipeline_cls = StableDiffusionLatentUpscalePipeline

    @property
    def latent_grid(self) -> tuple[int, int]:
        """(multiple, floor) of the latent sides this replica's UNet takes (4 and 8 for
        sd-x2-latent-upscaler's four levels)."""
        return latent_grid(self.pipe.unet.config.down_block_types, self.upscale_factor)

    @property
    def image_grid(self) -> tuple[int, int]:
        """(multiple, floor) of the image sides: the latent grid times the VAE's scale
        factor (32 and 64 pixels for sd-x2-latent-upscaler)."""
        multiple, floor = self.latent_grid
        return multiple * self.pipe.vae_scale_factor, floor * self.pipe.vae_scale_factor

    async def upscale(self, job, source):
        """Upscale ``source`` x2: uint8 images (H, W, 3) / (N, H, W, 3), or latents
        (N, 4, h, w) of the SD VAE (images of H = 8h by W = 8w pixels).

        Returns uint8 (N, 2H, 2W, 3) for any size: the input is padded to the size the UNet
        takes and the output cropped back.
        """
        source, carried = unwrap(source)
        count = len(job.seeds)
        # Guards for callers other than the ingress: inputs of the job's count and layout,
        # before the GPU call.
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
        # Keyed on the size as given: jobs batched together pad to one size and crop alike.
        key = (shape, job.num_inference_steps, job.guidance_scale, job.negative_prompt is None)
        return await self._submit("upscale", job, (source,), key, carried)

    def _batch_upscale(self, entries):
        job = entries[0].job
        first = entries[0].inputs[0]
        if isinstance(first, torch.Tensor):
            (multiple, floor), scale = self.latent_grid, self.pipe.vae_scale_factor
            height, width = first.shape[-2:]
            padded = (padded_side(height, multiple, floor), padded_side(width, multiple, floor))
            image = torch.cat([pad_latents(entry.inputs[0], *padded) for entry in entries])
        else:
            (multiple, floor), scale = self.image_grid, 1
            height, width = first.shape[-3:-1]
            padded = (padded_side(height, multiple, floor), padded_side(width, multiple, floor))
            image = np.concatenate([images_to_float(pad_images(e.inputs[0], *padded), e.images)
                                    for e in entries])
        output = self.pipe(
            **batch_text(entries),
            image=image,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            output_type="pt",
            callback=self._legacy_step_callback(entries),
            callback_steps=1,
        ).images
        output = crop(pixels_to_uint8(output), self.upscale_factor * scale * height,
                      self.upscale_factor * scale * width)
        return split(output, entries)
