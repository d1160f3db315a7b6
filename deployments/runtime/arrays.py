"""Array helpers of the model replicas: seeds to generators, images to and from floats,
padding inputs to the size a model takes and cropping its output back, cutting a batch's
output into each job's part."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deployments.runtime.batching import BatchEntry
from deployments.errors import InvalidJobError

def generators(seeds: tuple[int, ...]) -> list[torch.Generator]:
    """One CPU generator per image, so image i depends only on its own seed.

    CPU generators give the same initial noise on every device, so a seed means the same
    image on a laptop and on a GPU server (up to kernel precision).
    """
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (N, H, W, C) to uint8, rounding as PIL conversion does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def images_to_float(images: np.ndarray, count: int) -> np.ndarray:
    """uint8 (H, W, 3) or (N, H, W, 3) to float32 (count, H, W, 3) in [0, 1].

    A single image is repeated ``count`` times (one per seed); a batch must already hold
    ``count`` images.
    """
    if images.ndim == 3:
        images = np.repeat(images[None], count, axis=0)
    if images.shape[0] != count:
        raise InvalidJobError(f"expected {count} images, got {images.shape[0]}")
    return images.astype(np.float32) / 255.0


def padded_side(side: int, multiple: int, floor: int = 1) -> int:
    """The smallest multiple of ``multiple`` that is at least ``side`` and ``floor``."""
    return max(side, floor, 1) + (-max(side, floor, 1)) % multiple


def pad_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 images (H, W, C) or (N, H, W, C) padded at the bottom and on the right to
    (height, width) by repeating their edge pixels; returned as they are when they fit."""
    extra_h, extra_w = height - images.shape[-3], width - images.shape[-2]
    if extra_h < 0 or extra_w < 0:
        raise ValueError(f"cannot pad {images.shape[-3]}x{images.shape[-2]} to {height}x{width}")
    if extra_h == 0 and extra_w == 0:
        return images
    widths = [(0, 0)] * images.ndim
    widths[-3], widths[-2] = (0, extra_h), (0, extra_w)
    return np.pad(images, widths, mode="edge")


def pad_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Latents (N, C, h, w) padded at the bottom and on the right to (height, width) by
    repeating their edge values; returned as they are when they fit."""
    extra_h, extra_w = height - latents.shape[-2], width - latents.shape[-1]
    if extra_h < 0 or extra_w < 0:
        raise ValueError(f"cannot pad {latents.shape[-2]}x{latents.shape[-1]} to {height}x{width}")
    if extra_h == 0 and extra_w == 0:
        return latents
    return torch.nn.functional.pad(latents, (0, extra_w, 0, extra_h), mode="replicate")


def crop(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """The top-left (height, width) of images (N, H, W, C): a padded input's output, less
    what the padding added."""
    return images[:, :height, :width]


def pixels_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1], as a pipeline's ``output_type="pt"`` leaves them on
    its device, to uint8 (N, H, W, 3) on the host, rounding as :func:`to_uint8` does.

    Converted where they are: from a GPU the host receives a quarter of float32's bytes
    and does no arithmetic on them (``output_type="np"`` would copy float32 to the host
    and leave the conversion to its CPU, tens of milliseconds a megapixel image).
    """
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round_().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def finish(output, output_latents: bool):
    """Latents go to the next replica as float32 CPU tensors; images (a pipeline's
    ``output_type="pt"``) leave as uint8 host arrays."""
    if output_latents:
        return output.to("cpu", torch.float32)
    return pixels_to_uint8(output)


def split(output, entries: list[BatchEntry]) -> list[Any]:
    """Cut a batch's output into each job's images, in order."""
    parts, start = [], 0
    for entry in entries:
        parts.append(output[start : start + entry.images])
        start += entry.images
    return parts


def batch_text(entries: list[BatchEntry]) -> dict[str, Any]:
    """Prompts, negative prompts and generators of a batch, one per image.

    Jobs batch together only when all or none have a negative prompt (SDXL treats a
    missing one differently from an empty one), so None stays None.
    """
    prompts = [e.job.prompt for e in entries for _ in range(e.images)]
    negatives = None
    if entries[0].job.negative_prompt is not None:
        negatives = [e.job.negative_prompt for e in entries for _ in range(e.images)]
    seeds = tuple(seed for e in entries for seed in e.job.seeds)
    text = {"prompt": prompts, "negative_prompt": negatives, "generator": generators(seeds)}
    # SDXL's second text encoder: its own prompts where a job has them, else the first's
    # (what SDXL does with prompt_2=None). Only SDXL jobs carry them.
    if any(getattr(e.job, "prompt_2", None) is not None for e in entries):
        text["prompt_2"] = [e.job.prompt_2 or e.job.prompt for e in entries for _ in range(e.images)]
    if negatives is not None and any(getattr(e.job, "negative_prompt_2", None) is not None
                                     for e in entries):
        text["negative_prompt_2"] = [e.job.negative_prompt_2 or e.job.negative_prompt
                                     for e in entries for _ in range(e.images)]
    return text
