"""Livepeer's routes: the runner's fields and defaults, '|' prompts, and its error shapes."""

import asyncio

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.runtime.arrays import batch_text
from deployments.runtime.batching import BatchEntry
from deployments.contract import PipelineSpec, TextToImageJob
from serve_app.config import load_app_config
from serve_app.protocol.errors import InvalidRequestError, ModelNotFoundError
from serve_app.fronts.livepeer import (
    LivepeerTextToImageRequest,
    parse_loras,
    livepeer_error,
    livepeer_validation_errors,
    split_prompt,
)
from serve_app.service.planning import plan_request


@pytest.fixture
def config(tiny_args):
    return load_app_config({k: v for k, v in tiny_args.items() if k != "safety"})


def test_text_to_image_takes_the_runners_defaults():
    request = LivepeerTextToImageRequest(prompt="a cat")
    assert (request.width, request.height, request.num_inference_steps) == (1024, 576, 50)
    assert (request.guidance_scale, request.loras, request.model_id) == (7.5, "", "")
    converted = request.to_request()
    assert converted.size == "1024x576" and converted.model is None
    assert converted.moderation == "auto" and converted.negative_prompt == ""


def test_the_clients_defaults_plan_on_the_tiny_profile(config):
    plan = plan_request(LivepeerTextToImageRequest(prompt="a cat").to_request(), config)
    assert (plan.width, plan.height) == (1024, 576)
    assert plan.stages[0].job.num_inference_steps == 50


@pytest.mark.parametrize("loras", ["", "  ", "{}"])
def test_empty_loras_are_none(loras):
    assert parse_loras(loras) == ()


def test_loras_is_livepeers_json_map():
    assert parse_loras('{"ink": 0.5, "a/b": 1}') == (("ink", 0.5), ("a/b", 1.0))


@pytest.mark.parametrize("loras", ["not json", "[1]", '{"ink": 3}', '{"ink": "x"}'])
def test_malformed_loras_are_a_400_naming_loras(loras):
    with pytest.raises(InvalidRequestError) as info:
        parse_loras(loras)
    assert info.value.param == "loras"


def test_livepeer_loras_reach_the_job(config):
    request = LivepeerTextToImageRequest(prompt="a cat", loras='{"ink": 0.5}', width=512, height=512)
    (ref,) = plan_request(request.to_request(), config).stages[0].job.loras
    assert (ref.name, ref.weight, ref.source) == ("ink", 0.5, "tiny:lora/sd21/ink")


def test_split_prompt_follows_the_runner():
    assert split_prompt("a cat") == ("a cat", ())
    assert split_prompt(" a cat | oil painting ") == ("a cat", ("oil painting",))
    assert split_prompt("a | | b | c") == ("a", ("b", "c"))
    assert split_prompt("") == ("", ())


def test_a_second_prompt_goes_to_sdxls_second_encoder(config):
    request = LivepeerTextToImageRequest(
        prompt="a cat | watercolor", negative_prompt="blur | dark",
        model_id="stable-diffusion-xl", width=512, height=512).to_request()
    job = plan_request(request, config).stages[0].job
    assert (job.prompt, job.prompt_2) == ("a cat", "watercolor")
    assert (job.negative_prompt, job.negative_prompt_2) == ("blur", "dark")
    chain = LivepeerTextToImageRequest(
        prompt="a cat | watercolor", model_id="stable-diffusion-xl-with-refiner").to_request()
    assert plan_request(chain, config).stages[0].job.prompt_2 == "watercolor"


@pytest.mark.parametrize(
    "fields,param",
    [({"prompt": "a cat | watercolor"}, "prompt"),  # SD 2.1 has one text encoder
     ({"prompt": "a cat", "negative_prompt": "a | b"}, "negative_prompt"),
     ({"prompt": "a | b | c", "model_id": "stable-diffusion-xl", "width": 512, "height": 512}, "prompt")],
)
def test_more_prompts_than_text_encoders_is_a_400(config, fields, param):
    with pytest.raises(InvalidRequestError) as info:
        plan_request(LivepeerTextToImageRequest(**fields).to_request(), config)
    assert info.value.param == param and "text encoder" in info.value.message


def test_a_blank_first_prompt_is_refused():
    with pytest.raises(InvalidRequestError) as info:
        LivepeerTextToImageRequest(prompt=" | ").to_request()
    assert info.value.param == "prompt"


def test_image_to_image_counts_the_steps_that_run(config):
    from serve_app.fronts.livepeer import LivepeerImageToImageForm

    image = np.zeros((64, 64, 3), np.uint8)

    def plan(**fields):
        form = LivepeerImageToImageForm.model_construct(
            **{**{k: f.default for k, f in LivepeerImageToImageForm.model_fields.items()
                  if k != "image"}, "prompt": "a fox", **fields})
        return plan_request(form.to_request(), config, image, None)

    assert plan().stages[0].job.num_inference_steps == 100  # 100 x 0.8 = 80 run: allowed
    assert plan(num_inference_steps=200, strength=0.5).stages[0].job.strength == 0.5  # 100 run
    with pytest.raises(InvalidRequestError) as info:
        plan(num_inference_steps=200, strength=0.6)
    assert info.value.param == "num_inference_steps" and "runs 120" in info.value.message


def test_errors_in_the_runners_shape():
    status, body = livepeer_error(InvalidRequestError("101 steps is over", param="num_inference_steps"))
    assert (status, body) == (400, {"detail": {"msg": "num_inference_steps: 101 steps is over"}})
    status, body = livepeer_error(ModelNotFoundError("x/y", ["a"]))
    assert status == 400 and "x/y" in body["detail"]["msg"]  # the runner's answer to another model


def test_validation_errors_in_fastapis_shape():
    with pytest.raises(ValidationError) as info:
        LivepeerTextToImageRequest(prompt="a", num_images_per_prompt=0)
    errors = [dict(e, loc=("body", *e["loc"])) for e in info.value.errors()]
    (detail,) = livepeer_validation_errors(errors)["detail"]
    assert detail["loc"] == ["body", "num_images_per_prompt"] and set(detail) == {"loc", "msg", "type"}


def _entry(job):
    return BatchEntry(kind="text_to_image", job=job, inputs=(), key=None, images=len(job.seeds), future=None)


def test_batch_text_gives_each_image_its_second_prompt():
    plain = TextToImageJob("a", "n", 64, 64, 1, 5.0, (1,))
    second = TextToImageJob("b", "m", 64, 64, 1, 5.0, (2, 3), prompt_2="b2", negative_prompt_2="m2")
    text = batch_text([_entry(plain), _entry(second)])
    assert text["prompt_2"] == ["a", "b2", "b2"]
    assert text["negative_prompt_2"] == ["n", "m2", "m2"]
    assert "prompt_2" not in batch_text([_entry(plain)])


@pytest.fixture(scope="module")
def sdxl():
    from deployments.pipelines.sdxl import SDXLBaseDeployment

    return SDXLBaseDeployment(PipelineSpec(name="xl", family="sdxl", source="tiny:sdxl"))


def test_sdxls_second_prompt_changes_the_image_and_defaults_to_the_first(sdxl):
    def run(**kw):
        job = TextToImageJob("a cat", None, 64, 64, 2, 5.0, (4,), **kw)
        return asyncio.run(sdxl.text_to_image(job)).output

    plain = run()
    assert np.array_equal(plain, run(prompt_2="a cat"))
    assert not np.array_equal(plain, run(prompt_2="a watercolor of a dog"))
