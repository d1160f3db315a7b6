"""Real-ESRGAN x2 (and other ESRGAN-family nets), loaded with spandrel from a .pth file.

spandrel detects the architecture and scale from the state dict, so any .pth or
.safetensors file of the family loads through the same code: a local file, one Hub file
(``hf://ai-forever/Real-ESRGAN/RealESRGAN_x2.pth``), or a stand-in's.
"""

from __future__ import annotations

import numpy as np
import torch

from deployments.runtime.batching import PipelineCancelled, batch_cancelled
from deployments.contract import unwrap
from deployments.runtime.arrays import pixels_to_uint8
from deployments.errors import InvalidJobError
from deployments.runtime.loading import load_stand_in, logger, select_device
from deployments.runtime.replica import PipelineDeployment
from deployments.sources import local_path


class ESRGANDeployment(PipelineDeployment):
    """One spandrel ImageModelDescriptor per replica."""

    def load(self, spec):
        from spandrel import ImageModelDescriptor, ModelLoader

        stand_in = load_stand_in(spec)
        if stand_in is not None:
            return stand_in
        device, dtype = select_device(spec)
        model = ModelLoader().load_from_file(local_path(spec.source))
        if not isinstance(model, ImageModelDescriptor):
            raise ValueError(f"{spec.source} is not an image-to-image model")
        model.to(device).eval()
        if dtype == torch.float16 and model.supports_half:
            model.half()
        elif dtype == torch.bfloat16 and model.supports_bfloat16:
            model.bfloat16()
        self.dtype = next(model.model.parameters()).dtype
        logger.info("%s: loaded %s x%d from %s on %s (%s)", spec.name, model.architecture.name,
                    model.scale, spec.source, device, self.dtype)
        return model, device

    @property
    def scale(self) -> int:
        return self.pipe.scale

    async def upscale(self, job, source):
        """Upscale uint8 images (H, W, 3) / (N, H, W, 3) by the net's scale.

        The net is deterministic: a single image is upscaled once and repeated for each
        seed, so n copies cost one forward pass. Same-size images of concurrent requests
        go through the net together.
        """
        source, carried = unwrap(source)
        if isinstance(source, torch.Tensor):
            raise InvalidJobError(f"{self.spec.name} upscales images, not latents", param="upscale")
        # A guard for callers other than the ingress: one image per seed, before the GPU call.
        if source.ndim == 4 and source.shape[0] != len(job.seeds):
            raise InvalidJobError(f"expected {len(job.seeds)} images, got {source.shape[0]}")
        return await self._submit("upscale", job, (source,), (source.shape[-3:],), carried)

    def _batch_upscale(self, entries: list) -> list[np.ndarray]:
        # The distinct images: one per job given a single image, n per job given a batch.
        distinct = [e.inputs[0][None] if e.inputs[0].ndim == 3 else e.inputs[0] for e in entries]
        stacked = np.concatenate(distinct)
        outputs = []
        for start in range(0, len(stacked), self.spec.max_batch_images):
            if batch_cancelled(entries):
                raise PipelineCancelled(f"{self.spec.name}: all callers gone")
            chunk = torch.from_numpy(stacked[start : start + self.spec.max_batch_images])
            tensor = chunk.permute(0, 3, 1, 2).to(self.device, self.dtype) / 255.0
            outputs.append(pixels_to_uint8(self.pipe(tensor)))
        upscaled = np.concatenate(outputs)
        results, start = [], 0
        for entry, images in zip(entries, distinct):
            part = upscaled[start : start + len(images)]
            start += len(images)
            results.append(np.repeat(part, entry.images, axis=0) if entry.inputs[0].ndim == 3 else part)
        return results
