"""The safety checker: Stable Diffusion's NSFW classifier as its own deployment.

``StableDiffusionSafetyChecker`` (CLIP ViT-L/14 and concept embeddings, the weights of
CompVis/stable-diffusion-safety-checker) scores each image; the ingress decides what a flag
means (mark it, blur it, or refuse the request). It runs as the last stage of a request's
chain, so images go from the model replica to this one and never back through the ingress
unchecked; a flagged image is blurred here when the job asks for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from deployments.contract import StageResult, unwrap
from deployments.errors import InvalidJobError
from deployments.runtime.loading import load_stand_in, logger, select_device
from deployments.runtime.replica import PipelineDeployment
from deployments.sources import local_path

# Gaussian blur radius of a flagged image, as a fraction of its longer side.
BLUR_RADIUS_FRACTION = 0.04


def blur(image: np.ndarray) -> np.ndarray:
    """A strong Gaussian blur of a uint8 (H, W, 3) image: shapes stay, details go."""
    from PIL import Image, ImageFilter

    radius = max(2.0, BLUR_RADIUS_FRACTION * max(image.shape[:2]))
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


class SafetyCheckerDeployment(PipelineDeployment):
    """One safety checker and its CLIP image processor per replica; concurrent checks batch."""

    def load(self, spec):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        device, dtype = select_device(spec)
        self.dtype = dtype
        stand_in = load_stand_in(spec)
        if stand_in is not None:  # a whole stand-in checker brings its image processor
            self.processor = stand_in[0].processor
            return stand_in
        source = local_path(spec.source)
        kwargs = {"revision": spec.revision} if spec.revision else {}
        if Path(source).is_dir():
            kwargs["local_files_only"] = True
        self.processor = CLIPImageProcessor.from_pretrained(source, **kwargs)
        checker = StableDiffusionSafetyChecker.from_pretrained(source, dtype=dtype, **kwargs)
        checker.to(device).eval()
        # Its "a black image will be returned instead" warning is not what happens here.
        logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)
        self.dtype = dtype
        logger.info("%s: loaded the safety checker from %s on %s (%s)", spec.name, spec.source,
                    device, dtype)
        return checker, device

    async def check(self, job, source) -> StageResult:
        """Score uint8 images (N, H, W, 3), a previous stage's result or a preview (H, W, 3).

        Returns a StageResult of the images (flagged ones blurred if ``job.blur``) with
        ``nsfw`` set, and the earlier stages' cost plus this check's.
        """
        images, carried = unwrap(source)
        if isinstance(images, torch.Tensor) or not isinstance(images, np.ndarray):
            raise InvalidJobError("the safety checker takes images, not latents")
        batch = images[None] if images.ndim == 3 else images
        result = await self._submit("check", job, (batch,), (job.blur,), images=len(batch))
        checked, flags = result.output
        output = checked[0] if images.ndim == 3 else checked
        return StageResult(output, result.steps, result.seconds, nsfw=flags).plus(carried)

    def _batch_check(self, entries) -> list[tuple[np.ndarray, tuple[bool, ...]]]:
        # Images of different sizes batch together: the processor resizes each to the
        # checker's input size.
        images = [image for entry in entries for image in entry.inputs[0]]
        clip_input = self.processor(images, return_tensors="pt").pixel_values
        placeholder = np.zeros((len(images), 1), np.float32)  # the checker blacks out its copy
        _, flags = self.pipe(clip_input=clip_input.to(self.device, self.dtype), images=placeholder)
        results, start = [], 0
        for entry in entries:
            batch = entry.inputs[0]
            mine = tuple(bool(flag) for flag in flags[start : start + len(batch)])
            start += len(batch)
            if entry.job.blur and any(mine):
                batch = np.stack([blur(img) if flag else img for img, flag in zip(batch, mine)])
            results.append((batch, mine))
        return results
