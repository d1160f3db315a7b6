import asyncio
import base64
import io
import time

import pytest
from PIL import Image

from deployments.contract import RefineJob, TextToImageJob, Upstream, resolve_inputs
from serve_app.config import load_app_config
from serve_app.protocol.errors import InvalidRequestError, ModelNotFoundError
from serve_app.service.execution import run_plan
from serve_app.service.planning import plan_request
from serve_app.fronts.openai import ImageGenerationRequest
from serve_app.service.encoding import ResultShapeError
from serve_app.service.images import ImagesService
from tests.unit.fakes import FakeHandle, fake_handles


@pytest.fixture
def tiny_args(tiny_args):
    """The tiny app without its safety checker (tests/unit/test_safety.py covers that)."""
    return {key: value for key, value in tiny_args.items() if key != "safety"}


@pytest.fixture
def config(tiny_args):
    return load_app_config(tiny_args)


def req(**fields):
    """A generation request as planning takes it (validated by the wire model first)."""
    return ImageGenerationRequest(**{"prompt": "a cat", **fields}).to_request()


def test_default_model_and_defaults(config):
    plan = plan_request(req(), config, seed_source=lambda: 41)
    assert plan.model == "stable-diffusion-2-1"
    assert plan.seeds == (41,)
    (stage,) = plan.stages
    assert stage.deployment == "stable-diffusion-2-1" and isinstance(stage.job, TextToImageJob)
    defaults = config.model("stable-diffusion-2-1").defaults
    assert stage.job == TextToImageJob(
        "a cat", None, 512, 512, defaults.num_inference_steps, defaults.guidance_scale, (41,)
    )


def test_seeds_are_consecutive_from_the_request_seed(config):
    plan = plan_request(req(n=3, seed=10), config, seed_source=lambda: 0)
    assert plan.seeds == (10, 11, 12)
    assert plan.stages[0].job.seeds == (10, 11, 12)


def test_a_drawn_seed_keeps_every_images_seed_in_32_bits(config, monkeypatch):
    # The one place a seed is drawn, for every front: at its highest draw, the last of the
    # most images a request may ask for still fits Stability's uint32 Artifact.seed.
    from serve_app.service import planning
    from serve_app.protocol.request import DRAWN_SEED_LIMIT, MAX_N

    monkeypatch.setattr(planning.secrets, "randbelow", lambda limit: limit - 1)
    assert planning.draw_seed() + MAX_N - 1 == DRAWN_SEED_LIMIT - 1
    plan = plan_request(req(n=4), config)
    assert plan.seeds == tuple(range(DRAWN_SEED_LIMIT - MAX_N, DRAWN_SEED_LIMIT - MAX_N + 4))


def test_request_values_override_defaults(config):
    plan = plan_request(
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
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner", seed=5, n=2), config)
    base, refiner = plan.stages
    assert (base.deployment, type(base.job)) == ("stable-diffusion-xl", TextToImageJob)
    assert (refiner.deployment, type(refiner.job)) == ("stable-diffusion-xl-refiner", RefineJob)
    assert base.job.denoising_end == 0.8
    assert refiner.job == RefineJob("a cat", None, 5, 5.0, (5, 6), denoising_start=0.8)
    custom = plan_request(req(model="stable-diffusion-xl-with-refiner", high_noise_frac=0.6), config)
    assert custom.stages[0].job.denoising_end == custom.stages[1].job.denoising_start == 0.6


def test_chain_hands_the_base_response_to_the_refiner_unresolved(config):
    handles = fake_handles(config)
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner", seed=3), config)
    images = asyncio.run(run_plan(plan, handles)).output
    (base_call,) = handles["stable-diffusion-xl"].calls
    (refine_call,) = handles["stable-diffusion-xl-refiner"].calls
    # The refiner receives the base's response by reference (Upstream): the refiner
    # replica fetches it, so latents never come back through the ingress.
    assert isinstance(refine_call.args[1], Upstream) and refine_call.args[1].ref is base_call
    assert images.shape == (1, 1024, 1024, 3)


def test_later_stages_that_may_be_at_zero_are_woken_when_the_chain_starts(config):
    # tiny.yaml: SDXL, its refiner and the upscalers start on demand (min_replicas 0).
    assert config.on_demand_deployments() == {
        "stable-diffusion-xl", "stable-diffusion-xl-refiner", "stable-diffusion-x2-latent-upscaler",
        "stable-diffusion-x4-upscaler", "esrgan-x2"}
    order = []

    class Recording(FakeHandle):
        def __getattr__(self, method):
            order.append((self.name, method))
            return super().__getattr__(method)

    handles = {name: Recording(name) for name in fake_handles(config)}
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner", seed=3, upscale="esrgan-x2",
                               size="512x512"), config)
    asyncio.run(run_plan(plan, handles, on_demand=config.on_demand_deployments()))
    # The refiner and the upscaler are asked for `ready` right after the base gets its job,
    # before their own jobs (which wait for the stage before): their replicas start while
    # the base works. Nothing else is woken.
    assert order == [("stable-diffusion-xl", "run"), ("stable-diffusion-xl-refiner", "ready"),
                     ("esrgan-x2", "ready"), ("stable-diffusion-xl-refiner", "run"), ("esrgan-x2", "run")]
    # Without on-demand deployments, no extra call.
    order.clear()
    asyncio.run(run_plan(plan, handles))
    assert [method for _, method in order] == ["run", "run", "run"]


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"size": "776x776"}, "size"),  # over 768x768's area
        ({"size": "1024x248"}, "size"),  # a side under min_side
        ({"size": "516x516"}, "size"),  # not multiples of 8
        ({"num_inference_steps": 101}, "num_inference_steps"),
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
        plan_request(req(**fields), config)
    assert info.value.param == param and info.value.status_code == 400


def test_max_n_comes_from_the_model(tiny_args):
    tiny_args = {**tiny_args, "models": [dict(tiny_args["models"][0], limits={
        **tiny_args["models"][0]["limits"], "max_n": 2})], "chains": [], "default_upscaler": None}
    config = load_app_config(tiny_args)
    with pytest.raises(InvalidRequestError, match="limit of 2") as info:
        plan_request(req(n=3), config)
    assert info.value.param == "n"


def test_unknown_model_is_404_naming_the_known_ones(config):
    with pytest.raises(ModelNotFoundError) as info:
        plan_request(req(model="dall-e-3"), config)
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


@pytest.mark.parametrize("stalled", ["stable-diffusion-2-1", "SafetyChecker"])
def test_a_request_waiting_on_a_deployment_that_cannot_start_is_a_503_naming_the_cause(stalled, tiny_args):
    from serve_app.protocol.errors import ModelUnavailableError
    from serve_app.service.execution import START_WATCH_FIRST_S

    # (The fakes hand a stage's response on without awaiting it: the last stage stalls.)
    checked = stalled == "SafetyChecker"
    config = load_app_config(dict(tiny_args, safety={"source": "tiny:safety-checker"}) if checked else tiny_args)
    handles = fake_handles(config, **{stalled: FakeHandle(stalled, delay_s=3600)})
    cause = "FileNotFoundError: [Errno 2] No such file or directory: '/models/x.pth'"
    asked = []

    async def start_failures():
        asked.append(1)
        return {stalled: cause}

    service = ImagesService(config, handles, start_failures=start_failures)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        asyncio.run(service.generate(req()))
    assert time.monotonic() - started < START_WATCH_FIRST_S + 1 and asked == [1]
    error = info.value
    assert (error.status_code, error.error_type, error.code) == (503, "server_error", "model_unavailable")
    assert cause in error.message and error.headers["Retry-After"]
    assert ("safety checker" in error.message) == checked
    assert all(call.cancelled for call in handles[stalled].calls)  # its work is called off


def test_a_request_that_finishes_never_asks_for_start_failures(config):
    async def start_failures():
        raise AssertionError("asked")

    service = ImagesService(config, fake_handles(config), start_failures=start_failures)
    assert len(asyncio.run(service.generate(req(n=2))).data) == 2


def test_service_refuses_a_wrong_number_of_images(config):
    handles = fake_handles(
        config, **{"stable-diffusion-2-1": FakeHandle("sd", shape_override=(1, 512, 512, 3))}
    )
    service = ImagesService(config, handles)
    with pytest.raises(ResultShapeError):
        asyncio.run(service.generate(req(n=2)))


# --- edits, variations, upscaling and chains ------------------------------------------

import numpy as np  # noqa: E402

from deployments.contract import ImageToImageJob, UpscaleJob  # noqa: E402
from serve_app.service.execution import _sized_inputs  # noqa: E402
from serve_app.fronts.openai import ImageEditForm, ImageVariationForm, UpscaleForm  # noqa: E402

UPLOAD = object()  # stands in for the UploadFile: planning only sees decoded arrays


def edit_form(**fields):
    return ImageEditForm.model_construct(**{**ImageEditForm(image=_upload(), prompt="a fox").model_dump(), **fields})


def edit(**fields):
    return edit_form(**fields).to_request()


def _upload():
    from io import BytesIO

    from fastapi import UploadFile

    return UploadFile(BytesIO(b""), filename="x.png")


def upscale_form(**fields):
    return UpscaleForm.model_construct(**{**UpscaleForm(image=_upload()).model_dump(), **fields}).to_request()


def pixels(height, width):
    return np.zeros((height, width, 3), np.uint8)


def test_edit_defaults_to_the_input_size_rounded_down_to_8(config):
    plan = plan_request(edit(seed=4, n=2), config, pixels(301, 517), None)
    (stage,) = plan.stages
    assert (plan.width, plan.height) == (512, 296)
    assert isinstance(stage.job, ImageToImageJob) and len(stage.inputs) == 1
    # Execution resizes the upload to the job's size on the ingress's CPU.
    assert [a.shape for a in _sized_inputs(stage)] == [(296, 512, 3)]
    defaults = config.model("stable-diffusion-2-1").defaults
    assert stage.job == ImageToImageJob("a fox", None, 512, 296, defaults.num_inference_steps,
                                        defaults.guidance_scale, defaults.strength, (4, 5))


def test_edit_with_mask_inpaints_at_full_strength(config):
    mask = np.zeros((64, 64), np.uint8)
    plan = plan_request(edit(size="128x128"), config, pixels(64, 64), mask)
    (stage,) = plan.stages
    assert stage.job.strength == 1.0 and [a.shape for a in _sized_inputs(stage)] == [(128, 128, 3), (128, 128)]


@pytest.mark.parametrize(
    "fields,image,mask,param",
    [
        ({"size": "100x100"}, (64, 64), None, "size"),
        ({"size": "1024x1024"}, (64, 64), None, "size"),
        ({}, (40, 400), None, "image"),
        ({}, (64, 64), (32, 32), "mask"),
        ({"model": "stable-diffusion-xl-with-refiner"}, (64, 64), None, "model"),
        ({"model": "esrgan-x2"}, (64, 64), None, "model"),
        ({"strength": 0.1, "num_inference_steps": 4}, (64, 64), None, "strength"),
        ({"upscale": "stable-diffusion-2-1"}, (64, 64), None, "upscale"),
    ],
)
def test_edit_errors(config, fields, image, mask, param):
    mask_pixels = np.zeros(mask, np.uint8) if mask else None
    with pytest.raises(InvalidRequestError) as info:
        plan_request(edit(**fields), config, pixels(*image), mask_pixels)
    assert info.value.param == param


def test_variation_has_no_prompt(config):
    form = ImageVariationForm.model_construct(**ImageVariationForm(image=_upload()).model_dump())
    plan = plan_request(form.to_request(), config, pixels(64, 64), None)
    assert plan.stages[0].job.prompt == ""


def test_upscale_defaults_to_the_configured_upscaler_and_factor(config):
    plan = plan_request(upscale_form(prompt="sharp", seed=1, n=2), config, pixels(100, 150))
    (stage,) = plan.stages
    assert (plan.model, plan.width, plan.height) == ("stable-diffusion-x2-latent-upscaler", 300, 200)
    defaults = config.model("stable-diffusion-x2-latent-upscaler").defaults
    assert stage.job == UpscaleJob("sharp", None, defaults.num_inference_steps, defaults.guidance_scale, (1, 2))
    assert stage.inputs[0].shape == (100, 150, 3)


@pytest.mark.parametrize(
    "fields,size",
    [({"width": 1000}, (1000, 667)), ({"height": 50}, (75, 50)), ({"model": "stable-diffusion-x4-upscaler"}, (600, 400))],
)
def test_upscale_output_size(config, fields, size):
    plan = plan_request(upscale_form(**fields), config, pixels(100, 150))
    assert (plan.width, plan.height) == size


def test_esrgan_ignores_the_diffusion_fields(config):
    plan = plan_request(upscale_form(model="esrgan-v1-x2plus", prompt="x", num_inference_steps=30), config, pixels(100, 150))
    assert plan.model == "esrgan-x2" and plan.stages[0].job.prompt == ""


@pytest.mark.parametrize(
    "fields,image,param,needle",
    [
        ({"model": "stable-diffusion-x4-upscaler"}, (512, 769), "image", "393216"),
        ({"model": "esrgan-x2"}, (1024, 1025), "image", "1048576"),
        ({}, (1025, 1024), "image", "1048576"),
        ({"width": 100, "height": 100}, (64, 64), "height", "not both"),
        ({"width": 16384}, (100, 100), "width", "output pixels"),
        ({"model": "stable-diffusion-2-1"}, (64, 64), "model", "upscale"),
        ({"noise_level": 10}, (64, 64), "noise_level", "x4"),
        ({}, (4, 4), "image", "at least 8"),
    ],
)
def test_upscale_limits(config, fields, image, param, needle):
    with pytest.raises(InvalidRequestError) as info:
        plan_request(upscale_form(**fields), config, pixels(*image))
    assert info.value.param == param and needle in info.value.message


def test_generate_then_latent_upscale_hands_over_latents(config):
    plan = plan_request(req(size="512x512", upscale="stabilityai/sd-x2-latent-upscaler", seed=8, n=2), config)
    generate, upscale = plan.stages
    assert generate.job.output_latents is True
    assert (upscale.deployment, type(upscale.job)) == ("stable-diffusion-x2-latent-upscaler", UpscaleJob)
    assert upscale.job.prompt == "a cat" and upscale.job.seeds == (8, 9)
    assert (plan.width, plan.height) == (1024, 1024)


@pytest.mark.parametrize("model", ["stable-diffusion-xl", "stable-diffusion-xl-with-refiner"])
def test_sdxl_then_x2_hands_over_images_not_latents(config, model):
    # The x2 latent upscaler knows the SD 1.x/2.x VAE's latent space only.
    plan = plan_request(req(model=model, size="512x512",
                               upscale="stable-diffusion-x2-latent-upscaler"), config)
    assert plan.stages[-2].job.output_latents is False
    assert (plan.stages[-1].deployment, plan.width) == ("stable-diffusion-x2-latent-upscaler", 1024)


def test_generate_then_image_upscalers_hand_over_images(config):
    for name, factor in (("stable-diffusion-x4-upscaler", 4), ("esrgan-v1-x2plus", 2)):
        plan = plan_request(req(size="512x512", upscale=name), config)
        assert plan.stages[0].job.output_latents is False
        assert (plan.width, plan.height) == (512 * factor, 512 * factor)


def test_refiner_chain_then_upscale(config):
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner", size="512x512",
                               upscale="esrgan-x2"), config)
    assert [s.deployment for s in plan.stages] == [
        "stable-diffusion-xl", "stable-diffusion-xl-refiner", "esrgan-x2"]
    assert plan.stages[1].job.output_latents is False


def test_upscale_chain_limits(config):
    with pytest.raises(InvalidRequestError) as info:
        plan_request(req(model="stable-diffusion-xl", size="1024x1024",
                            upscale="stable-diffusion-x4-upscaler"), config)
    assert info.value.param == "upscale" and "393216" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        plan_request(req(upscale="nope"), config)
    assert info.value.param == "upscale"


def test_chain_of_three_passes_each_response_on(config):
    handles = fake_handles(config)
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner", size="256x256", upscale="esrgan-x2"), config)
    asyncio.run(run_plan(plan, handles))
    (base,) = handles["stable-diffusion-xl"].calls
    (refine,) = handles["stable-diffusion-xl-refiner"].calls
    (upscale,) = handles["esrgan-x2"].calls
    assert refine.args[1].ref is base and upscale.args[1].ref is refine


def test_timeout_cancels_every_stage(config):
    handles = fake_handles(config, **{"stable-diffusion-xl-refiner": FakeHandle("ref", delay_s=5)})
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner"), config)
    with pytest.raises(TimeoutError):
        asyncio.run(run_plan(plan, handles, timeout_s=0.05))
    calls = handles["stable-diffusion-xl"].calls + handles["stable-diffusion-xl-refiner"].calls
    assert len(calls) == 2 and all(call.cancelled for call in calls)


def test_service_turns_timeouts_into_504(tiny_args):
    from serve_app.protocol.errors import GatewayTimeoutError

    config = load_app_config({**tiny_args, "ingress": {"request_timeout_s": 0.05}})
    service = ImagesService(config, fake_handles(
        config, **{"stable-diffusion-2-1": FakeHandle("sd", delay_s=5)}))
    with pytest.raises(GatewayTimeoutError) as info:
        asyncio.run(service.generate(req()))
    assert info.value.status_code == 504 and "0.05" in info.value.message


def test_prompt_length_limit(tiny_args):
    config = load_app_config({**tiny_args, "ingress": {"max_prompt_chars": 10}})
    for fields, param in (({"prompt": "x" * 11}, "prompt"), ({"negative_prompt": "y" * 11}, "negative_prompt")):
        with pytest.raises(InvalidRequestError) as info:
            plan_request(req(**fields), config)
        assert info.value.param == param and "limit is 10" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        plan_request(edit(prompt="z" * 11), config, pixels(64, 64), None)
    assert info.value.param == "prompt"


def test_total_output_pixels_limit(tiny_args):
    config = load_app_config({**tiny_args, "ingress": {"max_request_pixels": 3 * 512 * 512}})
    plan_request(req(n=3, size="512x512"), config)
    with pytest.raises(InvalidRequestError) as info:
        plan_request(req(n=4, size="512x512"), config)
    assert info.value.param == "n" and "786432" in info.value.message
    with pytest.raises(InvalidRequestError):  # upscaling counts the output size
        plan_request(req(n=1, size="512x512", upscale="esrgan-x2"), config)
    with pytest.raises(InvalidRequestError):
        plan_request(upscale_form(n=4), config, pixels(256, 256))


def test_loras_resolve_to_the_models_adapters(config):
    (ref,) = plan_request(req(loras=[{"name": "pastel"}]), config).stages[0].job.loras
    assert (ref.name, ref.source, ref.weight) == ("pastel", "tiny:lora/sd21/pastel", 0.8)  # its default
    refs = plan_request(req(loras={"ink": 0.5, "grain": -1}), config).stages[0].job.loras
    assert [(r.name, r.weight) for r in refs] == [("ink", 0.5), ("grain", -1.0)]


def test_a_chains_loras_go_to_its_base_only(config):
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner", loras={"ink": 1.0}), config)
    assert [r.name for r in plan.stages[0].job.loras] == ["ink"]
    assert not hasattr(plan.stages[1].job, "loras")  # the refiner takes none
    plan = plan_request(req(loras={"ink": 1.0}, upscale="stable-diffusion-x4-upscaler",
                               size="256x256"), config)
    assert plan.stages[0].job.loras and not hasattr(plan.stages[1].job, "loras")


@pytest.mark.parametrize(
    "loras,needle",
    [({"nope": 1.0}, "not a LoRA adapter"),  # unknown
     ({"ink": 1.0, "pastel": 1.0, "grain": 1.0}, "at most 2"),  # too many
     ({"org/some-lora": 1.0}, "not a LoRA adapter")],  # Hub ids only where allowed
)
def test_bad_loras_are_400_naming_loras(config, loras, needle):
    with pytest.raises(InvalidRequestError, match=needle) as info:
        plan_request(req(loras=loras), config)
    assert info.value.param == "loras"


def test_a_model_without_adapters_refuses_them(config):
    with pytest.raises(InvalidRequestError) as info:  # the SDXL refiner chain's base has "ink" only
        plan_request(req(model="stable-diffusion-xl", loras={"pastel": 1.0}), config)
    assert info.value.param == "loras" and "ink" in info.value.message


def test_weights_outside_the_range_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        req(loras={"ink": 2.5})


def test_hub_loras_where_the_operator_allows_them(tiny_args):
    args = dict(tiny_args, models=[dict(tiny_args["models"][0], allow_hub_loras=True)] + tiny_args["models"][1:])
    config = load_app_config(args)
    (ref,) = plan_request(req(loras={"org/some-lora": 0.7}), config).stages[0].job.loras
    assert (ref.name, ref.source, ref.weight) == ("org/some-lora", "org/some-lora", 0.7)


def test_an_input_whose_replica_was_lost_ends_the_stage_with_upstream_lost():
    """A lost node makes the previous stage's result an ActorUnavailableError; the next
    replica raises UpstreamLost at once (Serve would retry it as its own until timeout),
    which the ingress answers with a 503; an ordinary error travels on unchanged."""
    from ray.exceptions import ActorUnavailableError

    from deployments.errors import InvalidJobError, UpstreamLost
    from serve_app.protocol.errors import error_from_exception

    async def failing(exc):
        raise exc

    class Ref:
        def __init__(self, exc=None, value=None):
            self.exc, self.value = exc, value

        def __await__(self):
            return (failing(self.exc) if self.exc else asyncio.sleep(0, self.value)).__await__()

    assert asyncio.run(resolve_inputs((Upstream(Ref(value=7)), 8))) == (7, 8)
    plain = (np.zeros(2),)
    assert asyncio.run(resolve_inputs(plain)) is plain
    with pytest.raises(UpstreamLost) as lost:
        asyncio.run(resolve_inputs((Upstream(Ref(ActorUnavailableError("gone", b"\0" * 16))),)))
    error = error_from_exception(lost.value)
    assert (error.status_code, error.code) == (503, "overloaded")
    with pytest.raises(InvalidJobError):
        asyncio.run(resolve_inputs((Upstream(Ref(InvalidJobError("bad", param="image"))),)))
