"""The safety checker: planning, the service's policies (with fake handles), the
deployment class on the tiny checker, and the tiny checker itself."""

import asyncio
import base64
import copy

import numpy as np
import pytest

from deployments.errors import InvalidJobError
from deployments.contract import SafetyJob, Upstream
from serve_app.config import ConfigError, load_app_config
from serve_app.protocol.errors import InvalidRequestError, ModerationBlockedError
from serve_app.service.execution import run_plan
from serve_app.service.planning import plan_request
from serve_app.fronts.openai import ImageGenerationRequest, ImageVariationForm
from serve_app.service.images import ImagesService
from tests.unit.fakes import FakeSafetyHandle, fake_handles
from tests.unit.test_planning import edit, edit_form, pixels, upscale_form


def app_config(tiny_args, **safety):
    args = copy.deepcopy(tiny_args)
    args["safety"] = {**args["safety"], **safety}
    return load_app_config(args)


def req(**fields):
    return ImageGenerationRequest(**{"prompt": "a cat", "seed": 0, **fields}).to_request()


@pytest.mark.parametrize(
    "policy, moderation, blur, reject",
    [("blur", "auto", True, False), ("reject", "auto", False, True), ("flag", "auto", False, False),
     ("blur", "low", False, False), ("reject", "low", False, False)],
)
def test_policy_and_moderation_decide_the_check(tiny_args, policy, moderation, blur, reject):
    plan = plan_request(req(moderation=moderation), app_config(tiny_args, policy=policy))
    assert plan.safety == SafetyJob(blur=blur)
    assert plan.reject_flagged is reject
    # Previews of a stream are checked when flagged images must not be seen as made.
    assert plan.check_previews is (blur or reject)


def test_no_checker_no_check(tiny_args):
    args = {k: v for k, v in tiny_args.items() if k != "safety"}
    plan = plan_request(req(moderation="low"), load_app_config(args))
    assert plan.safety is None and not plan.reject_flagged


def test_low_moderation_can_be_refused(tiny_args):
    config = app_config(tiny_args, allow_low=False)
    with pytest.raises(InvalidRequestError) as info:
        plan_request(req(moderation="low"), config)
    assert info.value.param == "moderation"
    assert plan_request(req(), config).safety is not None


def test_low_moderation_is_refused_by_default(tiny_args):
    """Only a config that says so lets a caller turn the checker's blur or reject off; the
    shipped GPU and cluster profiles do not."""
    from serve_app.config import SafetyConfig
    from serve_app.tools.launch import load_serve_config
    from tests.conftest import REPO_ROOT

    assert SafetyConfig(source="tiny:safety-checker").allow_low is False
    args = copy.deepcopy(tiny_args)
    args["safety"] = {k: v for k, v in args["safety"].items() if k != "allow_low"}
    with pytest.raises(InvalidRequestError) as info:
        plan_request(req(moderation="low"), load_app_config(args))
    assert info.value.param == "moderation" and info.value.status_code == 400
    for name in ("local-gpu", "cluster"):
        safety = load_serve_config(REPO_ROOT / "configs" / f"{name}.yaml")["applications"][0]["args"]["safety"]
        assert not safety.get("allow_low") and not safety.get("allow_low_keys"), name


def test_low_moderation_per_key(tiny_args):
    """safety.allow_low_keys: the keys so named may ask for 'low', no other caller."""
    import dataclasses

    from serve_app.protocol.keys import owner_of
    from serve_app.protocol.keys import load_api_keys

    config = app_config(tiny_args, allow_low=False, allow_low_keys=["ops"])
    keys = load_api_keys({"SERVE_APP_API_KEYS": "ops:sk-ops,sk-other"})
    owners = keys.owners_named(config.safety.allow_low_keys)
    low = req(moderation="low")
    plan = plan_request(dataclasses.replace(low, owner=owner_of(b"sk-ops")), config,
                        low_moderation_owners=owners)
    assert plan.safety == SafetyJob(blur=False) and not plan.reject_flagged
    for owner in (owner_of(b"sk-other"), ""):
        with pytest.raises(InvalidRequestError) as info:
            plan_request(dataclasses.replace(low, owner=owner), config, low_moderation_owners=owners)
        assert info.value.param == "moderation" and "this API key" in info.value.message
    # Through the service, as the ingress and the jobs' consumer build it.
    service = ImagesService(config, fake_handles(config), low_moderation_owners=owners)
    asyncio.run(service.plan(dataclasses.replace(low, owner=owner_of(b"sk-ops"))))
    with pytest.raises(InvalidRequestError):
        asyncio.run(service.plan(dataclasses.replace(low, owner=owner_of(b"sk-other"))))


def test_allow_low_keys_must_name_keys_the_ingress_has(tiny_args):
    from serve_app.fronts.ingress import check_keys
    from serve_app.protocol.keys import load_api_keys

    config = app_config(tiny_args, allow_low_keys=["ops"])
    assert check_keys(config, load_api_keys({"SERVE_APP_API_KEYS": "ops:sk-ops"}), [])
    with pytest.raises(ConfigError, match="safety.allow_low_keys"):
        check_keys(config, load_api_keys({"SERVE_APP_API_KEYS": "sk-ops"}), [])


def test_livepeers_safety_check_false_is_refused_naming_its_field(tiny_args):
    """Livepeer's `safety_check: false` is moderation 'low': refused alike, its own field named."""
    from serve_app.fronts.livepeer import LivepeerTextToImageRequest, rename_param

    config = app_config(tiny_args, allow_low=False)
    request = LivepeerTextToImageRequest(prompt="a cat", safety_check=False).to_request()
    with pytest.raises(InvalidRequestError) as info:
        plan_request(request, config)
    assert rename_param(info.value).param == "safety_check"


def test_every_route_is_checked_and_names_what_it_judged(tiny_args):
    config = app_config(tiny_args, policy="reject")
    image = pixels(64, 64)
    fields = {k: v for k, v in edit_form().model_dump().items() if k not in ("prompt", "mask", "upscale",
                                                                            "stream", "partial_images")}
    variation = ImageVariationForm.model_construct(**fields).to_request()
    plans = {
        "prompt": [plan_request(req(), config), plan_request(edit(), config, image, None)],
        "image": [plan_request(variation, config, image, None),
                  plan_request(upscale_form(), config, image)],
    }
    for param, group in plans.items():
        for plan in group:
            assert plan.safety is not None and plan.moderation_param == param


def test_the_checker_gets_the_last_stage_response_unresolved(tiny_args):
    config = app_config(tiny_args)
    handles = fake_handles(config)
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner", size="256x256"), config)
    asyncio.run(run_plan(plan, handles))
    (refine,) = handles["stable-diffusion-xl-refiner"].calls
    (check,) = handles["SafetyChecker"].calls
    assert check.method == "run" and check.args == (SafetyJob(blur=True), Upstream(refine))


def _service(tiny_args, flagged, **safety):
    config = app_config(tiny_args, **safety)
    checker = FakeSafetyHandle(flagged=flagged, seconds=0.25)
    return ImagesService(config, fake_handles(config, SafetyChecker=checker))


def _gray_levels(response):
    from io import BytesIO

    from PIL import Image

    return [int(np.asarray(Image.open(BytesIO(base64.b64decode(d.b64_json))))[0, 0, 0])
            for d in response.data]


def test_blur_policy_marks_and_blurs_only_flagged_images(tiny_args):
    service = _service(tiny_args, flagged={1}, policy="blur")
    response = asyncio.run(service.generate(req(n=3, seed=10, size="256x256")))
    assert [d.nsfw for d in response.data] == [False, True, False]
    # The fake model paints image i gray (seed % 256); the fake checker's blur paints 128.
    assert _gray_levels(response) == [10, 128, 12]
    assert response.usage.model_seconds == 0.25  # the check's time is the request's too
    low = asyncio.run(service.generate(req(n=3, seed=10, size="256x256", moderation="low")))
    assert [d.nsfw for d in low.data] == [False, True, False] and _gray_levels(low) == [10, 11, 12]


def test_flag_policy_returns_images_as_made(tiny_args):
    service = _service(tiny_args, flagged={0}, policy="flag")
    response = asyncio.run(service.generate(req(n=2, seed=20, size="256x256")))
    assert [d.nsfw for d in response.data] == [True, False] and _gray_levels(response) == [20, 21]


def test_reject_policy_refuses_a_request_with_a_flagged_image(tiny_args):
    service = _service(tiny_args, flagged={2}, policy="reject")
    with pytest.raises(ModerationBlockedError) as info:
        asyncio.run(service.generate(req(n=3)))
    error = info.value
    assert (error.status_code, error.param, error.code) == (400, "prompt", "moderation_blocked")
    assert "1 of 3" in error.message
    body = error.to_response().error
    assert body.type == "image_generation_user_error"
    # Nothing flagged, nothing refused; moderation low only marks.
    assert [d.nsfw for d in asyncio.run(service.generate(req(n=2))).data] == [False, False]
    low = asyncio.run(service.generate(req(n=3, moderation="low")))
    assert [d.nsfw for d in low.data] == [False, False, True]


def test_without_a_checker_data_carries_no_nsfw(tiny_args):
    args = {k: v for k, v in tiny_args.items() if k != "safety"}
    config = load_app_config(args)
    response = asyncio.run(ImagesService(config, fake_handles(config)).generate(req()))
    assert "nsfw" not in response.model_dump(exclude_none=True)["data"][0]


def test_livepeer_safety_check_maps_to_moderation():
    from serve_app.fronts.livepeer import LivepeerTextToImageRequest, rename_param, to_livepeer
    from serve_app.protocol.responses import ImageData, ImagesResponse, ImagesUsage

    assert LivepeerTextToImageRequest(prompt="x").to_request().moderation == "auto"
    assert LivepeerTextToImageRequest(prompt="x", safety_check=False).to_request().moderation == "low"
    assert rename_param(InvalidRequestError("no", param="moderation")).param == "safety_check"
    usage = ImagesUsage(denoising_steps=1, output_pixels=1, model_seconds=0.0)
    flagged = ImagesResponse(created=0, data=[ImageData(b64_json="AA==", seed=1, nsfw=True),
                                              ImageData(b64_json="AA==", seed=2)],
                             output_format="png", size="8x8", usage=usage)
    assert [m.nsfw for m in to_livepeer(flagged).images] == [True, False]


def test_config_rejects_reserved_names_and_a_wrong_tiny_source(tiny_args):
    args = copy.deepcopy(tiny_args)
    args["models"][0]["name"] = "SafetyChecker"
    with pytest.raises(ConfigError, match="reserved"):
        load_app_config(args)
    with pytest.raises(ConfigError, match="tiny:safety-checker"):
        app_config(tiny_args, source="tiny:sd21")
    with pytest.raises(ConfigError, match="safety.policy"):
        app_config(tiny_args, policy="hide")


# The deployment class on the tiny checker, called directly (no Ray).


@pytest.fixture(scope="module")
def checker():
    from deployments.contract import PipelineSpec
    from deployments.pipelines.safety import SafetyCheckerDeployment

    return SafetyCheckerDeployment(
        PipelineSpec(name="SafetyChecker", family="safety-checker", source="tiny:safety-checker",
                     dtype="float32"))


@pytest.fixture(scope="module")
def calibration_images():
    """Tiny SD 2.1 images of the calibration request, made by the deployment class."""
    from deployments.contract import PipelineSpec, TextToImageJob
    from deployments.pipelines.stable_diffusion import StableDiffusionDeployment
    from deployments.standins.tiny import SAFETY_CALIBRATION as cal

    sd = StableDiffusionDeployment(PipelineSpec(name="sd", family="sd21", source="tiny:sd21"))
    job = TextToImageJob(cal["prompt"], None, cal["size"], cal["size"], cal["steps"], 7.5,
                         tuple(cal["seeds"])[:8])
    return asyncio.run(sd.text_to_image(job)).output


def library_flags(checker, images):
    """The oracle: diffusers' own checker call on the same images."""
    clip_input = checker.processor(list(images), return_tensors="pt").pixel_values
    _, flags = checker.pipe(clip_input=clip_input, images=np.zeros((len(images), 1)))
    return tuple(bool(f) for f in flags)


def test_tiny_checker_flags_some_calibration_images_not_all(checker, calibration_images):
    result = asyncio.run(checker.check(SafetyJob(blur=False), calibration_images))
    assert result.nsfw == library_flags(checker, calibration_images)
    assert any(result.nsfw) and not all(result.nsfw)
    assert np.array_equal(result.output, calibration_images)  # 'flag' leaves pixels alone


def test_blur_changes_only_flagged_images_and_smooths_them(checker, calibration_images):
    result = asyncio.run(checker.check(SafetyJob(blur=True), calibration_images))
    for before, after, flag in zip(calibration_images, result.output, result.nsfw):
        if not flag:
            assert np.array_equal(before, after)
            continue
        detail = lambda im: np.abs(np.diff(im.astype(int), axis=1)).mean()  # noqa: E731
        assert after.shape == before.shape and detail(after) < detail(before) / 4


def test_check_carries_the_cost_of_earlier_stages(checker, calibration_images):
    from deployments.contract import StageResult

    earlier = StageResult(calibration_images, steps=32, seconds=1.5)
    result = asyncio.run(checker.check(SafetyJob(), earlier))
    assert result.steps == 32 and result.seconds > 1.5 and len(result.nsfw) == 8


def test_a_preview_is_one_image_and_latents_are_refused(checker, calibration_images):
    import torch

    one = asyncio.run(checker.check(SafetyJob(blur=True), calibration_images[1]))
    assert one.output.shape == calibration_images[1].shape and len(one.nsfw) == 1
    with pytest.raises(InvalidJobError):
        asyncio.run(checker.check(SafetyJob(), torch.zeros(1, 4, 8, 8)))
