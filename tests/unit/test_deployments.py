"""The deployment classes on tiny models, called directly (no Ray)."""

import asyncio

import numpy as np
import pytest

from deployments.errors import InvalidJobError
from deployments.jobs import PipelineSpec, RefineJob, TextToImageJob
from deployments.sdxl import SDXLBaseDeployment, SDXLRefinerDeployment
from deployments.stable_diffusion import StableDiffusionDeployment


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def sd():
    return StableDiffusionDeployment(PipelineSpec(name="sd", family="sd21", source="tiny:sd21"))


@pytest.fixture(scope="module")
def sdxl():
    return SDXLBaseDeployment(PipelineSpec(name="xl", family="sdxl", source="tiny:sdxl"))


@pytest.fixture(scope="module")
def refiner():
    return SDXLRefinerDeployment(
        PipelineSpec(name="ref", family="sdxl-refiner", source="tiny:sdxl-refiner")
    )


def job(seeds, **kw):
    fields = dict(prompt="a red fox", negative_prompt=None, width=256, height=192,
                  num_inference_steps=2, guidance_scale=7.5, seeds=tuple(seeds))
    fields.update(kw)
    return TextToImageJob(**fields)


def test_cpu_replica_runs_float32(sd):
    assert sd.device == "cpu" and sd.pipe.unet.dtype.is_floating_point
    assert str(sd.pipe.unet.dtype) == "torch.float32"


def test_text_to_image_returns_uint8_images_of_the_job_size(sd):
    images = run(sd.text_to_image(job([1, 2, 3])))
    assert images.dtype == np.uint8 and images.shape == (3, 192, 256, 3)


def test_same_seed_same_pixels_and_seed_i_is_batch_independent(sd):
    batch = run(sd.text_to_image(job([7, 8])))
    again = run(sd.text_to_image(job([7, 8])))
    assert np.array_equal(batch, again)
    alone = run(sd.text_to_image(job([8])))
    # Image 1 of a batch seeded 7 is image 0 of a request seeded 8.
    assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 2
    assert not np.array_equal(batch[0], batch[1])


def test_sd21_cannot_stop_at_latents(sd):
    with pytest.raises(InvalidJobError):
        run(sd.text_to_image(job([1], denoising_end=0.8)))


def test_sdxl_base_hands_latents_and_refiner_finishes(sdxl, refiner):
    latents = run(sdxl.text_to_image(job([4, 5], num_inference_steps=5, denoising_end=0.8)))
    assert tuple(latents.shape) == (2, 4, 192 // 8, 256 // 8)
    images = run(refiner.refine(
        RefineJob("a red fox", None, 5, 5.0, (4, 5), denoising_start=0.8), latents
    ))
    assert images.dtype == np.uint8 and images.shape == (2, 192, 256, 3)


def test_refiner_rejects_latents_for_another_count(sdxl, refiner):
    latents = run(sdxl.text_to_image(job([4], num_inference_steps=5, denoising_end=0.8)))
    with pytest.raises(InvalidJobError):
        run(refiner.refine(RefineJob("x", None, 5, 5.0, (1, 2), denoising_start=0.8), latents))


def test_sdxl_text_to_image_without_refiner(sdxl):
    images = run(sdxl.text_to_image(job([9], num_inference_steps=2)))
    assert images.shape == (1, 192, 256, 3)


def test_health_and_ready(sd):
    sd.check_health()
    assert run(sd.ready()) == "sd"
