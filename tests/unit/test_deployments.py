"""The deployment classes on tiny models, called directly (no Ray)."""

import asyncio

import numpy as np
import pytest

from deployments.contract import StageResult
from deployments.errors import InvalidJobError
from deployments.contract import PipelineSpec, RefineJob, TextToImageJob
from deployments.pipelines.sdxl import SDXLBaseDeployment, SDXLRefinerDeployment
from deployments.pipelines.stable_diffusion import StableDiffusionDeployment


def run(coro):
    """Run a deployment call; returns its output (the StageResult's cost is tested apart)."""
    return asyncio.run(coro).output


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
    latents = run(sdxl.text_to_image(job([4, 5], num_inference_steps=5, denoising_end=0.8, output_latents=True)))
    assert tuple(latents.shape) == (2, 4, 192 // 8, 256 // 8)
    images = run(refiner.refine(
        RefineJob("a red fox", None, 5, 5.0, (4, 5), denoising_start=0.8), latents
    ))
    assert images.dtype == np.uint8 and images.shape == (2, 192, 256, 3)


def test_each_stage_reports_the_seeds_it_made_its_images_with(sdxl, refiner):
    base = asyncio.run(sdxl.text_to_image(job([4, 5], num_inference_steps=5, denoising_end=0.8,
                                              output_latents=True)))
    assert base.seeds == (4, 5)
    refined = asyncio.run(refiner.refine(RefineJob("a red fox", None, 5, 5.0, (4, 5), denoising_start=0.8), base))
    assert refined.seeds == (4, 5) and refined.steps > base.steps
    # A stage that draws no noise of its own (the safety checker) passes its input's on.
    assert StageResult("checked", nsfw=(False, False)).plus(refined).seeds == (4, 5)


def test_refiner_rejects_latents_for_another_count(sdxl, refiner):
    latents = run(sdxl.text_to_image(job([4], num_inference_steps=5, denoising_end=0.8, output_latents=True)))
    with pytest.raises(InvalidJobError):
        run(refiner.refine(RefineJob("x", None, 5, 5.0, (1, 2), denoising_start=0.8), latents))


def test_sdxl_text_to_image_without_refiner(sdxl):
    images = run(sdxl.text_to_image(job([9], num_inference_steps=2)))
    assert images.shape == (1, 192, 256, 3)


def test_health_and_ready(sd):
    sd.check_health()
    assert asyncio.run(sd.ready()) == "sd"


def test_the_mixins_use_only_what_their_protocol_declares_and_the_base_has_it(sd):
    """TextToImageMixin and ImageToImageMixin reach their replica only through
    DenoisingReplica's members (or their own), and PipelineDeployment has every one."""
    import ast
    import inspect
    import typing

    from deployments.runtime import replica

    declared = set(typing.get_type_hints(replica.DenoisingReplica)) | {
        name for name, value in vars(replica.DenoisingReplica).items()
        if callable(value) and not name.startswith("__")}
    assert {"spec", "pipe", "_submit", "_pipeline"} <= declared
    for mixin in (replica.TextToImageMixin, replica.ImageToImageMixin):
        tree = ast.parse(inspect.getsource(mixin))
        own = set(vars(mixin)) | {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                                  and isinstance(node.ctx, ast.Store)}
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name) and node.value.id == "self"}
        assert used - own <= declared, (mixin.__name__, used - own - declared)
    for name in declared:  # methods on the class, attributes on a built replica
        assert hasattr(replica.PipelineDeployment, name) or hasattr(sd, name), name


# --- image to image, inpainting and upscalers -------------------------------------------

from deployments.pipelines.esrgan import ESRGANDeployment  # noqa: E402
from deployments.sources import Source, local_path  # noqa: E402
from deployments.contract import ImageToImageJob, UpscaleJob  # noqa: E402
from deployments.pipelines.latent_upscaler import LatentUpscalerDeployment  # noqa: E402
from deployments.pipelines.x4_upscaler import X4UpscalerDeployment  # noqa: E402


def edit_job(seeds, strength=0.5, width=128, height=96, **kw):
    return ImageToImageJob("a red fox", None, width, height, 4, 7.5, strength, tuple(seeds), **kw)


def upscale_job(seeds, **kw):
    return UpscaleJob("a red fox", None, 2, 7.5, tuple(seeds), **kw)


def gradient(height=96, width=128):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], -1).astype(np.uint8)


@pytest.mark.parametrize("fixture", ["sd", "sdxl"])
def test_edit_pipelines_share_the_loaded_weights(request, fixture):
    deployment = request.getfixturevalue(fixture)
    for view in (deployment.img2img, deployment.inpaint):
        assert view.unet is deployment.pipe.unet and view.vae is deployment.pipe.vae
        assert view.text_encoder is deployment.pipe.text_encoder


@pytest.mark.parametrize("fixture", ["sd", "sdxl"])
def test_image_to_image_and_strength(request, fixture):
    deployment = request.getfixturevalue(fixture)
    image = gradient()
    out = run(deployment.image_to_image(edit_job([1, 2], strength=0.5), image))
    assert out.shape == (2, 96, 128, 3) and out.dtype == np.uint8
    again = run(deployment.image_to_image(edit_job([1, 2], strength=0.5), image))
    assert np.array_equal(out, again)
    stronger = run(deployment.image_to_image(edit_job([1, 2], strength=1.0), image))
    assert not np.array_equal(out, stronger)


@pytest.mark.parametrize("fixture", ["sd", "sdxl"])
def test_a_mask_switches_to_inpainting(request, fixture):
    deployment = request.getfixturevalue(fixture)
    image = gradient()
    right = np.zeros((96, 128), np.uint8)
    right[:, 64:] = 255
    left = 255 - right
    plain = run(deployment.image_to_image(edit_job([3], strength=1.0), image))
    inpaint_right = run(deployment.image_to_image(edit_job([3], strength=1.0), image, right))
    inpaint_left = run(deployment.image_to_image(edit_job([3], strength=1.0), image, left))
    assert inpaint_right.shape == (1, 96, 128, 3)
    # The mask reaches the inpainting pipeline: each mask gives its own result.
    assert not np.array_equal(plain, inpaint_right)
    assert not np.array_equal(inpaint_left, inpaint_right)


def test_image_to_image_checks_sizes(sd):
    with pytest.raises(InvalidJobError) as info:
        run(sd.image_to_image(edit_job([1]), gradient(64, 64)))
    assert info.value.param == "image"
    with pytest.raises(InvalidJobError) as info:
        run(sd.image_to_image(edit_job([1]), gradient(), np.zeros((8, 8), np.uint8)))
    assert info.value.param == "mask"


@pytest.fixture(scope="module")
def x2():
    return LatentUpscalerDeployment(
        PipelineSpec(name="x2", family="sd-x2-latent-upscaler", source="tiny:sd-x2-latent-upscaler")
    )


@pytest.fixture(scope="module")
def x4():
    return X4UpscalerDeployment(
        PipelineSpec(name="x4", family="sd-x4-upscaler", source="tiny:sd-x4-upscaler")
    )


@pytest.fixture(scope="module")
def esrgan():
    return ESRGANDeployment(PipelineSpec(name="esrgan", family="esrgan", source="tiny:esrgan"))


def test_latent_upscaler_takes_images_and_sd_latents(sd, x2):
    out = run(x2.upscale(upscale_job([1, 2]), gradient(64, 96)))
    assert out.shape == (2, 128, 192, 3)
    latents = run(sd.text_to_image(job([5, 6], width=128, height=64, output_latents=True)))
    assert tuple(latents.shape) == (2, 4, 8, 16)
    out = run(x2.upscale(upscale_job([5, 6]), latents))
    assert out.shape == (2, 128, 256, 3)
    with pytest.raises(InvalidJobError):
        run(x2.upscale(upscale_job([5]), latents))


def test_latent_upscaler_refuses_latents_of_another_space(sdxl, x2):
    # SDXL's VAE is not the one the x2 upscaler was trained on: its latents are refused,
    # its images are taken.
    latents = asyncio.run(sdxl.text_to_image(job([5], width=64, height=64, output_latents=True)))
    assert latents.latent_space == "sdxl"
    with pytest.raises(InvalidJobError, match="sdxl latents"):
        run(x2.upscale(upscale_job([5]), latents))
    images = asyncio.run(sdxl.text_to_image(job([5], width=64, height=64)))
    assert run(x2.upscale(upscale_job([5]), images)).shape == (1, 128, 128, 3)


def test_tiny_sd_and_sdxl_latent_spaces_differ(sd, sdxl):
    # Same seed, same size: the two VAEs decode the same latents to other pixels.
    latents = run(sd.text_to_image(job([3], width=64, height=64, output_latents=True)))
    decode = lambda pipe: pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # noqa: E731
    import torch

    with torch.inference_mode():
        assert not torch.allclose(decode(sd.pipe), decode(sdxl.pipe))
    assert sd.pipe.vae.config.scaling_factor != sdxl.pipe.vae.config.scaling_factor


def test_x4_upscaler(x4):
    out = run(x4.upscale(upscale_job([1], noise_level=30), gradient(32, 48)))
    assert out.shape == (1, 128, 192, 3)
    batch = run(x4.upscale(upscale_job([1, 2]), np.stack([gradient(32, 48)] * 2)))
    assert batch.shape == (2, 128, 192, 3)
    with pytest.raises(InvalidJobError) as info:
        run(x4.upscale(upscale_job([1], noise_level=351), gradient(32, 48)))
    assert info.value.param == "noise_level"


def test_esrgan_doubles_and_is_deterministic(esrgan):
    image = gradient(30, 41)
    out = run(esrgan.upscale(upscale_job([1, 2, 3]), image))
    assert out.shape == (3, 60, 82, 3) and esrgan.scale == 2
    assert np.array_equal(out[0], out[2])


def test_weights_file_references(tmp_path):
    assert local_path(Source.parse("tiny:esrgan")).endswith("model.pth")
    assert local_path(Source.parse(str(tmp_path / "x.pth"))) == str(tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"hf://ID\[@REVISION\]/PATH"):
        Source.parse("hf://owner/just-a-repo")


def test_pipeline_calls_run_on_one_thread_per_replica(sd):
    import threading

    seen, run_group = [], sd.batcher.run_group

    def recording(kind, entries):
        seen.append(threading.current_thread().name)
        return run_group(kind, entries)

    async def calls():
        # Different guidance: three batches, one after another.
        await asyncio.gather(*(sd.text_to_image(job([i], num_inference_steps=1, width=64, height=64,
                                                    guidance_scale=float(i)))
                               for i in range(3)))

    sd.batcher.run_group = recording
    try:
        asyncio.run(calls())
        asyncio.run(calls())  # a second event loop, as a restarted caller would have
    finally:
        sd.batcher.run_group = run_group
    assert len(seen) == 6 and len(set(seen)) == 1 and seen[0].startswith("sd-pipeline")


def test_compile_records_no_cuda_graphs():
    # CUDA graphs belong to the thread and the shape they were recorded with.
    from deployments.runtime.loading import COMPILE_OPTIONS

    assert "cudagraphs" not in COMPILE_OPTIONS["mode"] or "no-cudagraphs" in COMPILE_OPTIONS["mode"]
    assert COMPILE_OPTIONS["mode"] != "reduce-overhead" and COMPILE_OPTIONS["dynamic"] is True


def test_results_carry_their_cost_along_a_chain(sdxl, refiner):
    base = asyncio.run(sdxl.text_to_image(job([4, 5], num_inference_steps=5, denoising_end=0.8,
                                               output_latents=True)))
    assert isinstance(base, StageResult) and base.seconds > 0
    assert base.steps == 2 * 4  # 2 images x the 4 of 5 steps above the 0.8 cut
    refined = asyncio.run(refiner.refine(
        RefineJob("a red fox", None, 5, 5.0, (4, 5), denoising_start=0.8), base))
    assert refined.steps == base.steps + 2 * 1
    assert refined.seconds > base.seconds


def test_the_job_type_picks_the_method(sd, esrgan):
    out = asyncio.run(sd.run(job([3], width=64, height=64))).output
    assert out.shape == (1, 64, 64, 3)
    with pytest.raises(InvalidJobError, match="does not run TextToImageJob"):
        asyncio.run(esrgan.run(job([3], width=64, height=64)))


def test_a_cuda_error_makes_the_replica_unhealthy(monkeypatch):
    replica = StableDiffusionDeployment(PipelineSpec(name="sick", family="sd21", source="tiny:sd21"))
    replica.check_health()  # healthy after loading

    def lost_context(entries):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(replica, "_batch_text_to_image", lost_context)
    with pytest.raises(RuntimeError, match="CUDA error"):
        asyncio.run(replica.run(job([1], width=64, height=64)))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        replica.check_health()


def test_batch_stats_stay_bounded():
    from deployments.runtime.batching import RECENT_BATCHES, Batcher

    batcher = Batcher(lambda kind, entries: [None] * len(entries), max_batch_images=1)

    async def many():
        await asyncio.gather(*(batcher.submit("k", None, (), i, 1) for i in range(RECENT_BATCHES + 5)))

    asyncio.run(many())
    assert batcher.stats.pipeline_calls == RECENT_BATCHES + 5
    assert len(batcher.stats.batch_sizes) == RECENT_BATCHES
