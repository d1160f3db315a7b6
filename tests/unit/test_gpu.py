"""CUDA paths on tiny models: fp16, SDPA attention, the safety checker and TAESD previews
on the GPU. Skipped without CUDA (CI has none; run them on a GPU machine)."""

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def spec(**fields):
    from deployments.contract import PipelineSpec

    return PipelineSpec(**{"name": "sd", "family": "sd21", "source": "tiny:sd21", "dtype": "float16",
                           **fields})


def test_sd21_runs_in_fp16_with_sdpa_on_cuda():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from deployments.contract import TextToImageJob
    from deployments.stable_diffusion import StableDiffusionDeployment

    sd = StableDiffusionDeployment(spec())
    assert sd.device == "cuda" and sd.pipe.unet.dtype == torch.float16
    assert all(isinstance(p, AttnProcessor2_0) for p in sd.pipe.unet.attn_processors.values())
    job = TextToImageJob("a red fox", None, 256, 256, 4, 7.5, (1, 2))
    images = asyncio.run(sd.text_to_image(job)).output
    assert images.shape == (2, 256, 256, 3) and images.dtype == np.uint8 and images.std() > 0


def test_preview_decoder_runs_on_cuda():
    from deployments.contract import TextToImageJob
    from deployments.stable_diffusion import StableDiffusionDeployment

    sd = StableDiffusionDeployment(spec(preview_decoder="tiny:taesd"))
    assert sd.preview_decoder.device.type == "cuda" and sd.preview_decoder.dtype == torch.float16

    async def collect():
        job = TextToImageJob("a red fox", None, 128, 96, 6, 7.5, (7,))
        return [event async for event in sd.stream(job, partial_images=2)]

    *partials, final = asyncio.run(collect())
    assert [e[2].shape for e in partials] == [(96, 128, 3)] * 2


def test_safety_checker_in_fp16_agrees_with_float32_on_cpu():
    from deployments.contract import SafetyJob, TextToImageJob
    from deployments.safety import SafetyCheckerDeployment
    from deployments.stable_diffusion import StableDiffusionDeployment
    from deployments.tiny import SAFETY_CALIBRATION as cal

    sd = StableDiffusionDeployment(spec(dtype="float32"))
    job = TextToImageJob(cal["prompt"], None, cal["size"], cal["size"], cal["steps"], 7.5,
                         tuple(cal["seeds"])[:8])
    images = asyncio.run(sd.text_to_image(job)).output
    gpu = SafetyCheckerDeployment(spec(name="SafetyChecker", family="safety-checker",
                                       source="tiny:safety-checker"))
    assert gpu.device == "cuda" and gpu.pipe.dtype == torch.float16
    flags = asyncio.run(gpu.check(SafetyJob(), images)).nsfw
    clip_input = gpu.processor(list(images), return_tensors="pt").pixel_values
    cpu = gpu.pipe.to("cpu", torch.float32)
    _, expected = cpu(clip_input=clip_input, images=np.zeros((len(images), 1)))
    assert list(flags) == [bool(f) for f in expected]
