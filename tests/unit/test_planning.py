import asyncio
import base64
import io

import pytest
from PIL import Image

from deployments.jobs import RefineJob, TextToImageJob
from serve_app.config import load_app_config
from serve_app.errors import InvalidRequestError, ModelNotFoundError
from serve_app.planning import plan_generation, run_plan
from serve_app.protocol import ImageGenerationRequest
from serve_app.serving import ImagesService, ResultShapeError
from tests.unit.fakes import FakeHandle, fake_handles


@pytest.fixture
def config(tiny_args):
    return load_app_config(tiny_args)


def req(**fields):
    return ImageGenerationRequest(**{"prompt": "a cat", **fields})


def test_default_model_and_defaults(config):
    plan = plan_generation(req(), config, seed_source=lambda: 41)
    assert plan.model == "stable-diffusion-2-1"
    assert plan.seeds == (41,)
    (stage,) = plan.stages
    assert stage.deployment == "stable-diffusion-2-1" and stage.method == "text_to_image"
    defaults = config.model("stable-diffusion-2-1").defaults
    assert stage.job == TextToImageJob(
        "a cat", None, 512, 512, defaults.num_inference_steps, defaults.guidance_scale, (41,)
    )


def test_seeds_are_consecutive_from_the_request_seed(config):
    plan = plan_generation(req(n=3, seed=10), config, seed_source=lambda: 0)
    assert plan.seeds == (10, 11, 12)
    assert plan.stages[0].job.seeds == (10, 11, 12)


def test_request_values_override_defaults(config):
    plan = plan_generation(
        req(model="stabilityai/stable-diffusion-xl-base-1.0", size="768x768", guidance_scale=3.0,
            num_inference_steps=7, negative_prompt="blur", seed=1),
        config,
    )
    job = plan.stages[0].job
    assert plan.model == "stable-diffusion-xl"
    assert (job.width, job.height, job.guidance_scale, job.num_inference_steps, job.negative_prompt) == (
        768, 768, 3.0, 7, "blur",
    )


def test_refiner_chain_plans_base_then_refiner(config):
    plan = plan_generation(req(model="stable-diffusion-xl-with-refiner", seed=5, n=2), config)
    base, refiner = plan.stages
    assert (base.deployment, base.method) == ("stable-diffusion-xl", "text_to_image")
    assert (refiner.deployment, refiner.method) == ("stable-diffusion-xl-refiner", "refine")
    assert base.job.denoising_end == 0.8
    assert refiner.job == RefineJob("a cat", None, 5, 5.0, (5, 6), denoising_start=0.8)
    custom = plan_generation(req(model="stable-diffusion-xl-with-refiner", high_noise_frac=0.6), config)
    assert custom.stages[0].job.denoising_end == custom.stages[1].job.denoising_start == 0.6


def test_chain_hands_the_base_response_to_the_refiner_unresolved(config):
    handles = fake_handles(config)
    plan = plan_generation(req(model="stable-diffusion-xl-with-refiner", seed=3), config)
    images = asyncio.run(run_plan(plan, handles))
    (base_call,) = handles["stable-diffusion-xl"].calls
    (refine_call,) = handles["stable-diffusion-xl-refiner"].calls
    # The refiner receives the base's response object itself: Serve resolves it on the
    # refiner replica, so latents never come back through the ingress.
    assert refine_call.args[1] is base_call
    assert images.shape == (1, 1024, 1024, 3)


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"size": "640x640"}, "size"),
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"output_format": "png", "output_compression": 50}, "output_compression"),
        ({"model": "stable-diffusion-xl-refiner"}, "model"),
        ({"high_noise_frac": 0.5}, "high_noise_frac"),
        ({"model": "stable-diffusion-xl-with-refiner", "num_inference_steps": 2, "high_noise_frac": 0.8},
         "num_inference_steps"),
        ({"seed": 2**63 - 1, "n": 2}, "seed"),
    ],
)
def test_model_limits_are_400_with_param(config, fields, param):
    with pytest.raises(InvalidRequestError) as info:
        plan_generation(req(**fields), config)
    assert info.value.param == param and info.value.status_code == 400


def test_max_n_comes_from_the_model(tiny_args):
    tiny_args = {**tiny_args, "models": [dict(tiny_args["models"][0], limits={
        **tiny_args["models"][0]["limits"], "max_n": 2})], "chains": []}
    config = load_app_config(tiny_args)
    with pytest.raises(InvalidRequestError, match="above the limit of 2") as info:
        plan_generation(req(n=3), config)
    assert info.value.param == "n"


def test_unknown_model_is_404_naming_the_known_ones(config):
    with pytest.raises(ModelNotFoundError) as info:
        plan_generation(req(model="dall-e-3"), config)
    error = info.value
    assert (error.status_code, error.param, error.code) == (404, "model", "model_not_found")
    assert "stable-diffusion-xl-with-refiner" in error.message


def test_service_encodes_every_image_with_its_seed(config):
    service = ImagesService(config, fake_handles(config))
    response = asyncio.run(service.generate(req(n=3, seed=100, size="256x256", output_format="jpeg",
                                                output_compression=90)))
    assert [d.seed for d in response.data] == [100, 101, 102]
    assert response.size == "256x256" and response.output_format == "jpeg"
    for item in response.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert (image.format, image.size) == ("JPEG", (256, 256))
        # The fake fills image i with gray level seed_i: the order is preserved.
        assert abs(image.getpixel((5, 5))[0] - item.seed) <= 2


def test_service_refuses_a_wrong_number_of_images(config):
    handles = fake_handles(
        config, **{"stable-diffusion-2-1": FakeHandle("sd", shape_override=(1, 512, 512, 3))}
    )
    service = ImagesService(config, handles)
    with pytest.raises(ResultShapeError):
        asyncio.run(service.generate(req(n=2)))
