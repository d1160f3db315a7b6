"""Half precision on CPU: with ``cpu_dtype: bfloat16`` every deployment class keeps every
module of every pipeline it holds in bfloat16, after construction and after a call. This
is the code path a float16 GPU replica takes (from_pipe, the refiner, upscalers, preview
decoder, safety checker), shown on a CPU."""

import asyncio

import numpy as np
import pytest
import torch

from deployments.contract import (
    ImageToImageJob,
    PipelineSpec,
    RefineJob,
    SafetyJob,
    TextToImageJob,
    UpscaleJob,
)

BF16 = torch.bfloat16


def spec(name: str, family: str, **fields) -> PipelineSpec:
    return PipelineSpec(name=name, family=family, source=f"tiny:{family}", cpu_dtype="bfloat16",
                        **fields)


def module_dtypes(owner) -> dict[str, set[torch.dtype]]:
    """Every torch module an object holds (a pipeline's components, or a module itself),
    with the dtypes of its floating-point parameters and buffers."""
    modules = {}
    if isinstance(owner, torch.nn.Module):
        modules["model"] = owner
    else:
        for name, value in getattr(owner, "components", {}).items():
            if isinstance(value, torch.nn.Module):
                modules[name] = value
    found = {}
    for name, module in modules.items():
        tensors = [*module.parameters(), *module.buffers()]
        found[name] = {t.dtype for t in tensors if t.is_floating_point()}
    return found


def assert_all(owner, label: str) -> None:
    dtypes = module_dtypes(owner)
    assert dtypes, f"{label}: no modules found"
    wrong = {name: found for name, found in dtypes.items() if found != {BF16}}
    assert not wrong, f"{label}: modules not in bfloat16: {wrong}"


def pipelines(deployment) -> dict:
    held = {"pipe": deployment.pipe}
    for attr in ("img2img", "inpaint", "preview_decoder"):
        if getattr(deployment, attr, None) is not None:
            held[attr] = getattr(deployment, attr)
    return held


def image(h=64, w=64):
    return (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)


def check(deployment, call):
    for label, owner in pipelines(deployment).items():
        assert_all(getattr(owner, "model", owner), f"{deployment.spec.name}.{label} after construction")
    result = asyncio.run(call)
    for label, owner in pipelines(deployment).items():
        assert_all(getattr(owner, "model", owner), f"{deployment.spec.name}.{label} after a call")
    return result


def test_sd21_text_image_and_inpaint_views_stay_bfloat16():
    from deployments.pipelines.stable_diffusion import StableDiffusionDeployment

    sd = StableDiffusionDeployment(spec("sd", "sd21", preview_decoder="tiny:taesd"))
    assert sd.device == "cpu" and set(pipelines(sd)) == {"pipe", "img2img", "inpaint", "preview_decoder"}
    out = check(sd, sd.text_to_image(TextToImageJob("a fox", None, 64, 64, 2, 7.5, (1,)))).output
    assert out.shape == (1, 64, 64, 3) and out.dtype == np.uint8
    edit = ImageToImageJob("a fox", None, 64, 64, 2, 7.5, 0.6, (1,))
    check(sd, sd.image_to_image(edit, image()))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    check(sd, sd.image_to_image(edit, image(), mask))


def test_sdxl_base_and_refiner_stay_bfloat16():
    from deployments.pipelines.sdxl import SDXLBaseDeployment, SDXLRefinerDeployment

    base = SDXLBaseDeployment(spec("xl", "sdxl", preview_decoder="tiny:taesdxl",
                                   vae="tiny:sdxl-vae-fp16-fix"))
    refiner = SDXLRefinerDeployment(spec("ref", "sdxl-refiner"))
    latents = check(base, base.text_to_image(
        TextToImageJob("a fox", None, 64, 64, 4, 5.0, (1,), denoising_end=0.5, output_latents=True)))
    check(base, base.image_to_image(ImageToImageJob("a fox", None, 64, 64, 2, 5.0, 0.6, (1,)), image()))
    out = check(refiner, refiner.refine(RefineJob("a fox", None, 4, 5.0, (1,), 0.5), latents)).output
    assert out.shape == (1, 64, 64, 3)


def test_upscalers_stay_bfloat16():
    from deployments.pipelines.esrgan import ESRGANDeployment
    from deployments.pipelines.latent_upscaler import LatentUpscalerDeployment
    from deployments.pipelines.x4_upscaler import X4UpscalerDeployment

    job = UpscaleJob("a fox", None, 2, 0.0, (1,))
    x2 = LatentUpscalerDeployment(spec("x2", "sd-x2-latent-upscaler"))
    assert check(x2, x2.upscale(job, image())).output.shape == (1, 128, 128, 3)
    x4 = X4UpscalerDeployment(spec("x4", "sd-x4-upscaler", vae_tiling=True))
    assert check(x4, x4.upscale(job, image(32, 32))).output.shape == (1, 128, 128, 3)
    esrgan = ESRGANDeployment(spec("esrgan", "esrgan"))
    assert check(esrgan, esrgan.upscale(job, image(16, 16))).output.shape == (1, 32, 32, 3)


def test_safety_checker_stays_bfloat16():
    from deployments.pipelines.safety import SafetyCheckerDeployment

    checker = SafetyCheckerDeployment(spec("SafetyChecker", "safety-checker"))
    result = check(checker, checker.check(SafetyJob(), np.stack([image(), image()])))
    assert len(result.nsfw) == 2


@pytest.mark.parametrize("family, cls_path", [
    ("sd21", "deployments.pipelines.stable_diffusion:StableDiffusionDeployment"),
    ("sdxl", "deployments.pipelines.sdxl:SDXLBaseDeployment"),
])
def test_float32_default_on_cpu(family, cls_path):
    from deployments.families import load_attribute

    deployment = load_attribute(cls_path)(PipelineSpec(name="m", family=family,
                                                       source=f"tiny:{family}", dtype="float16"))
    for owner in pipelines(deployment).values():
        assert set().union(*module_dtypes(owner).values()) == {torch.float32}
