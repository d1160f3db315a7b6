"""Upscalers take every input size at or above their family's ``min_input_side``: inputs
are padded to the size the model needs and the output cropped back to factor x the input.

Tiny models keep the real number of UNet and VAE levels, so the sizes that work here are
the sizes that work with the real weights.
"""

import asyncio
import json

import numpy as np
import pytest
import torch

from deployments.runtime.arrays import crop, generators, pad_images, pad_latents, padded_side, to_uint8
from deployments.runtime.batching import BatchEntry
from deployments.contract import PipelineSpec, TextToImageJob, UpscaleJob
from deployments.pipelines.esrgan import ESRGANDeployment
from deployments.families import FAMILIES
from deployments.pipelines.latent_upscaler import LatentUpscalerDeployment, latent_grid
from deployments.pipelines.stable_diffusion import StableDiffusionDeployment
from deployments.pipelines.x4_upscaler import X4UpscalerDeployment

UPSCALERS = {
    "sd-x2-latent-upscaler": LatentUpscalerDeployment,
    "sd-x4-upscaler": X4UpscalerDeployment,
    "esrgan": ESRGANDeployment,
}


def run(coro):
    return asyncio.run(coro).output


def upscale_job(seeds, steps=1, **kw):
    return UpscaleJob("a red fox", None, steps, 7.5, tuple(seeds), **kw)


def noise_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def upscalers():
    return {name: cls(PipelineSpec(name=name, family=name, source=f"tiny:{name}"))
            for name, cls in UPSCALERS.items()}


@pytest.fixture(scope="module")
def sd():
    return StableDiffusionDeployment(PipelineSpec(name="sd", family="sd21", source="tiny:sd21"))


# --- helpers ------------------------------------------------------------------------------

def test_padded_side():
    sides = (1, 8, 64, 65, 72, 96, 104)
    assert [padded_side(s, 32, 64) for s in sides] == [64, 64, 64, 96, 96, 96, 128]
    assert [padded_side(s, 4) for s in (1, 4, 5, 7, 8)] == [4, 4, 8, 8, 8]
    assert padded_side(9, 4, 8) == 12 and padded_side(3, 1) == 3


def test_pad_images_repeats_edges_and_crop_undoes_it():
    image = noise_image(5, 3)
    padded = pad_images(image, 8, 4)
    assert padded.shape == (8, 4, 3) and padded.dtype == np.uint8
    assert np.array_equal(padded[:5, :3], image)
    assert np.array_equal(padded[7, :3], image[4]) and np.array_equal(padded[:5, 3], image[:, 2])
    assert np.array_equal(padded[7, 3], image[4, 2])
    batch = np.stack([image, image[::-1]])
    assert np.array_equal(pad_images(batch, 8, 4)[1], pad_images(image[::-1], 8, 4))
    assert np.array_equal(crop(pad_images(batch, 8, 4), 5, 3), batch)
    assert pad_images(image, 5, 3) is image  # an image that fits is not copied
    with pytest.raises(ValueError):
        pad_images(image, 4, 4)


def test_pad_latents_replicates_edges():
    latents = torch.randn(2, 4, 3, 5)
    padded = pad_latents(latents, 4, 8)
    assert tuple(padded.shape) == (2, 4, 4, 8)
    assert torch.equal(padded[..., :3, :5], latents)
    assert torch.equal(padded[..., 3, :5], latents[..., 2, :])
    assert torch.equal(padded[..., :3, 7], latents[..., :, 4])
    assert pad_latents(latents, 3, 5) is latents


def test_the_x2_grid_comes_from_the_real_unet_config(upscalers):
    # Four K-block levels at twice the latents' size: latents a multiple of 4 and at least
    # 8 (two pixels at the lowest level), images a multiple of 32 and at least 64.
    folder = FAMILIES["sd-x2-latent-upscaler"].config_folder
    real = json.loads((folder / "unet" / "config.json").read_text())
    assert latent_grid(real["down_block_types"], 2) == (4, 8)
    x2 = upscalers["sd-x2-latent-upscaler"]
    assert x2.latent_grid == (4, 8) and x2.image_grid == (32, 64)
    assert upscalers["sd-x4-upscaler"].image_multiple == 4


# --- every size at or above the minimum ---------------------------------------------------

def test_every_editing_or_upscaling_family_has_a_min_input_side():
    for name, entry in FAMILIES.items():
        if entry.capabilities & {"upscale", "image-to-image"}:
            assert entry.min_input_side is not None and entry.min_input_side >= 1, name
        else:
            assert entry.min_input_side is None, name


@pytest.mark.parametrize("name", list(UPSCALERS))
@pytest.mark.parametrize("size", ["min", (48, 64), (72, 72), (104, 200), (200, 104)])
def test_outputs_are_exactly_factor_times_the_input(upscalers, name, size):
    height, width = (FAMILIES[name].min_input_side,) * 2 if size == "min" else size
    factor = FAMILIES[name].upscale_factor
    out = run(upscalers[name].upscale(upscale_job([1]), noise_image(height, width)))
    assert out.dtype == np.uint8 and out.shape == (1, factor * height, factor * width, 3)


def test_x2_takes_sd_latents_of_any_size(sd, upscalers):
    # 72x88 pixels: latents of 9x11, not multiples of the 4 the UNet needs.
    latents = asyncio.run(sd.text_to_image(TextToImageJob(
        "a red fox", None, 72, 88, 1, 7.5, (5, 6), output_latents=True)))
    assert tuple(latents.output.shape) == (2, 4, 11, 9)
    out = run(upscalers["sd-x2-latent-upscaler"].upscale(upscale_job([5, 6]), latents))
    assert out.shape == (2, 2 * 88, 2 * 72, 3)


def test_x2_takes_small_latents(upscalers):
    out = run(upscalers["sd-x2-latent-upscaler"].upscale(upscale_job([1]), torch.randn(1, 4, 1, 3)))
    assert out.shape == (1, 16, 48, 3)


# --- padding leaves inputs that fit alone -------------------------------------------------

def unpadded(deployment, seeds, image, **kwargs):
    """The pipeline called directly, as the deployment calls it, without any padding."""
    if isinstance(image, np.ndarray):
        image = np.repeat(image[None], len(seeds), 0).astype(np.float32) / 255.0
    with torch.inference_mode():
        output = deployment.pipe(prompt=["a red fox"] * len(seeds), negative_prompt=None,
                                 generator=generators(seeds), image=image, num_inference_steps=1,
                                 guidance_scale=7.5, output_type="np", **kwargs).images
    return to_uint8(output)


@pytest.mark.parametrize("name", ["sd-x2-latent-upscaler", "sd-x4-upscaler"])
def test_padding_leaves_an_input_on_the_grid_unchanged(upscalers, name, monkeypatch):
    deployment = upscalers[name]
    image = noise_image(64, 128, seed=3)
    kwargs = {"noise_level": 20} if name == "sd-x4-upscaler" else {}
    out = run(deployment.upscale(upscale_job([7, 8], **kwargs), image))
    assert np.array_equal(out, unpadded(deployment, (7, 8), image, **kwargs))
    # And the same through the deployment with padding switched off.
    monkeypatch.setattr(f"{type(deployment).__module__}.padded_side", lambda side, *_: side)
    assert np.array_equal(out, run(deployment.upscale(upscale_job([7, 8], **kwargs), image)))


def test_padding_leaves_latents_on_the_grid_unchanged(upscalers):
    x2 = upscalers["sd-x2-latent-upscaler"]
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    out = run(x2.upscale(upscale_job([4]), latents))
    assert out.shape == (1, 128, 192, 3)
    assert np.array_equal(out, unpadded(x2, (4,), latents))


# --- batching -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd-x2-latent-upscaler", "sd-x4-upscaler"])
def test_jobs_batch_by_the_size_given_and_crop_alike(upscalers, name, monkeypatch):
    deployment = upscalers[name]
    factor = FAMILIES[name].upscale_factor
    keys, submit = [], deployment.batcher.submit

    async def recording(kind, job, inputs, key, *args, **kwargs):
        keys.append(key)
        return await submit(kind, job, inputs, key, *args, **kwargs)

    monkeypatch.setattr(deployment.batcher, "submit", recording)
    run(deployment.upscale(upscale_job([1]), noise_image(72, 72)))
    run(deployment.upscale(upscale_job([1]), noise_image(80, 80)))
    # Both pad to 96x96 on the x2, yet keep keys of their own: their crops differ.
    assert keys[0] != keys[1]

    # One batch: a single image for two seeds and a batch of two, of one size.
    single = noise_image(72, 40, seed=1)
    pair = np.stack([noise_image(72, 40, seed=2), noise_image(72, 40, seed=3)])
    entries = [BatchEntry("upscale", upscale_job([1, 2]), (single,), "k", 2, None),
               BatchEntry("upscale", upscale_job([3, 4]), (pair,), "k", 2, None)]
    first, second = deployment._run_group("upscale", entries)
    assert first.shape == second.shape == (2, factor * 72, factor * 40, 3)
