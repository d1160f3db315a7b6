"""Every request field is bounded on the wire, on every front, and every count a model limits
is checked against that model before any model work: the step count of an image-to-image
schedule whatever its strength, and a value a scheduler would refuse."""

from typing import Any

import grpc
import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from deployments.families import FAMILIES
from serve_app.config import load_app_config
from serve_app.fronts import jobs, livepeer, openai, stability
from serve_app.fronts.gooseai import generation_pb2 as generation
from serve_app.protocol.errors import InvalidRequestError
from serve_app.service.planning import plan_request
from serve_app.protocol.request import MAX_PROMPT_CHARS, MAX_STEPS, ImageRequest

WIRE_MODELS = [
    openai.ImageGenerationRequest, openai.ImageEditForm, openai.ImageVariationForm,
    openai.UpscaleForm, livepeer.LivepeerTextToImageRequest, livepeer.LivepeerImageToImageForm,
    livepeer.LivepeerUpscaleForm, jobs.JobSubmission,
]


def _unbounded(name: str, schema: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    """The paths in ``schema`` of numbers without a maximum, texts without a length or
    pattern bound, and lists or maps without a count bound."""
    if "$ref" in schema:
        return _unbounded(name, defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    found = []
    # A bound beside the branches (a pattern from json_schema_extra) holds for each of them.
    outer = {key: schema[key] for key in ("pattern", "maxLength", "maximum") if key in schema}
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(key, []):
            found += _unbounded(name, {**branch, **outer}, defs)
    kind = schema.get("type")
    if kind in ("integer", "number") and not ({"maximum", "exclusiveMaximum"} & set(schema)):
        found.append(name)
    if kind == "string" and "enum" not in schema and "const" not in schema \
            and schema.get("format") != "binary" and "maxLength" not in schema \
            and not schema.get("pattern", "").endswith("$"):
        found.append(name)
    if kind == "array":
        if "maxItems" not in schema:
            found.append(name)
        found += _unbounded(name + "[]", schema.get("items", {}), defs)
    if kind == "object":
        properties = schema.get("properties", {})
        if not properties and "maxProperties" not in schema:
            found.append(name)
        for field, sub in properties.items():
            found += _unbounded(f"{name}.{field}", sub, defs)
        for sub in schema.get("patternProperties", {}).values():
            found += _unbounded(name + ".*", sub, defs)
    return found


@pytest.mark.parametrize("model", WIRE_MODELS, ids=lambda m: m.__name__)
def test_every_field_of_every_front_is_bounded_on_the_wire(model: type[BaseModel]):
    schema = model.model_json_schema()
    assert _unbounded(model.__name__, schema, schema.get("$defs", {})) == []


@pytest.mark.parametrize("model,fields", [
    (openai.ImageGenerationRequest, {"prompt": "a", "num_inference_steps": MAX_STEPS + 1}),
    (openai.ImageGenerationRequest, {"prompt": "a" * (MAX_PROMPT_CHARS + 1)}),
    (openai.ImageGenerationRequest, {"prompt": "a", "model": "m" * 257}),
    (openai.ImageGenerationRequest, {"prompt": "a", "loras": {f"a{i}": 1.0 for i in range(17)}}),
    (livepeer.LivepeerTextToImageRequest, {"prompt": "a", "num_inference_steps": 5_000_000}),
    (jobs.JobSubmission, {"operation": "generations", "input": {"prompt": "a"}, "webhook": "h" * 3000}),
])
def test_past_a_wire_bound_is_a_validation_error(model, fields):
    with pytest.raises(ValidationError):
        model(**fields)


def test_every_served_scheduler_takes_the_wire_ceiling_of_steps():
    # The wire ceiling is what the schedulers take: no model limit can go past it.
    trained = {family.train_timesteps for family in FAMILIES.values() if family.train_timesteps}
    assert trained == {MAX_STEPS}


@pytest.fixture
def config(tiny_args):
    return load_app_config({key: value for key, value in tiny_args.items() if key != "safety"})


def edit(**fields) -> ImageRequest:
    return ImageRequest(task="edit", prompt="a fox", **fields)


def image(side=64):
    return np.zeros((side, side, 3), np.uint8)


@pytest.mark.parametrize("steps,strength", [
    (5_000_000, 0.000002),  # 10 steps run, from a schedule of five million
    (1000, 0.01),  # 10 run; the scheduler would set up 1000 timesteps
    (401, 0.1),  # one past the default schedule limit: 4 x max_steps (100)
])
def test_an_image_to_image_schedule_is_bounded_whatever_the_strength(config, steps, strength):
    with pytest.raises(InvalidRequestError) as info:
        plan_request(edit(num_inference_steps=steps, strength=strength), config, image())
    assert info.value.param == "num_inference_steps"
    assert "schedule" in info.value.message and "400" in info.value.message


def test_a_schedule_at_its_limit_runs_its_share(config):
    plan = plan_request(edit(num_inference_steps=400, strength=0.25), config, image())
    assert plan.stages[0].job.num_inference_steps == 400 and plan.stages[0].job.strength == 0.25


def test_livepeers_image_to_image_defaults_fit_the_tiny_limits(config):
    # Its client sends 100 steps at strength 0.8 unless told: 80 run.
    form = livepeer.LivepeerImageToImageForm.model_construct(
        prompt="a fox", strength=livepeer.DEFAULT_STRENGTH,
        num_inference_steps=livepeer.IMAGE_TO_IMAGE_STEPS, model_id="", loras="", seed=None,
        negative_prompt="", guidance_scale=7.5, num_images_per_prompt=1, safety_check=True,
        image_guidance_scale=1.5)
    plan = plan_request(form.to_request(), config, image())
    assert plan.stages[0].job.num_inference_steps == 100


def test_steps_run_are_still_held_to_max_steps(config):
    with pytest.raises(InvalidRequestError) as info:
        plan_request(edit(num_inference_steps=400, strength=0.5), config, image())
    assert info.value.param == "num_inference_steps" and "runs 200" in info.value.message


def _model(tiny_args, **limits):
    args = {key: value for key, value in tiny_args.items() if key != "safety"}
    models = [dict(m) for m in args["models"]]
    models[0] = {**models[0], "limits": {**models[0]["limits"], **limits}}
    return {**args, "models": models}


def test_the_schedule_limit_defaults_to_four_times_max_steps_within_the_scheduler(tiny_args):
    config = load_app_config(_model(tiny_args, max_steps=300))
    assert config.models[0].max_schedule_steps == 1000  # 1200 is past the scheduler's 1000
    config = load_app_config(_model(tiny_args, max_schedule_steps=150))
    assert config.models[0].max_schedule_steps == 150


@pytest.mark.parametrize("limits,needle", [
    ({"max_steps": 1001}, "max_steps"),
    ({"max_schedule_steps": 50}, "max_schedule_steps"),
])
def test_the_config_refuses_step_limits_a_scheduler_would_not_take(tiny_args, limits, needle):
    from serve_app.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_app_config(_model(tiny_args, **limits))


def test_the_config_refuses_a_prompt_limit_past_the_wire_ceiling(tiny_args):
    from serve_app.config import ConfigError

    with pytest.raises(ConfigError, match="max_prompt_chars"):
        load_app_config({**tiny_args, "ingress": {"max_prompt_chars": MAX_PROMPT_CHARS + 1}})


# ---------------------------------------------------------------------------------------
# Stability's gRPC front: the same bounds, as INVALID_ARGUMENT naming the Request's field
# ---------------------------------------------------------------------------------------


def _sdk(**params):
    prompts = params.pop("prompts", [generation.Prompt(text="a lighthouse")])
    return generation.Request(engine_id="stable-diffusion-512-v2-1", prompt=prompts,
                              image=generation.ImageParameters(**params))


@pytest.mark.parametrize("request_,field", [
    (_sdk(steps=MAX_STEPS + 1), "image.steps"),
    (_sdk(prompts=[generation.Prompt(text="a")] * 5), "prompt"),
    (generation.Request(engine_id="e" * 300, prompt=[generation.Prompt(text="a")]), "engine_id"),
    (generation.Request(engine_id="x", request_id="r" * 300, prompt=[generation.Prompt(text="a")]), "request_id"),
    (_sdk(seed=list(range(1, 12))), "image.seed"),
    (_sdk(parameters=[generation.StepParameter()] * 100_000), "image.parameters"),
    (_sdk(prompts=[generation.Prompt(tokens=generation.Tokens(tokens=[generation.Token(id=1)] * 100_000))]),
     "prompt[0].tokens"),
])
def test_grpc_bounds_name_the_field(config, request_, field):
    with pytest.raises(stability.StabilityError) as info:
        stability.to_job(request_, config)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith(field + ":")


# ---------------------------------------------------------------------------------------
# Uploads: the model's limits before decoding, and decodes bounded per replica
# ---------------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG of ``width`` x ``height`` cut after its first bytes of pixels: the header is
    all that can be read, so decoding it would fail as truncated."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (9, 9, 9)).save(buffer, "PNG")
    return buffer.getvalue()[:120]


def _service(config):
    from serve_app.service.images import ImagesService
    from tests.unit.fakes import fake_handles

    return ImagesService(config, fake_handles(config))


@pytest.mark.parametrize("request_,needle", [
    (ImageRequest(task="upscale", model="esrgan-x2"), "input pixels"),  # 1048576 at most
    (ImageRequest(task="edit", prompt="a fox"), "output pixels"),  # SD 2.1: 589824 at most
    (ImageRequest(task="variation", model="stable-diffusion-xl"), "output pixels"),
])
def test_an_upload_over_the_models_limit_is_refused_from_its_header(config, request_, needle):
    import asyncio

    from serve_app.service.uploads import BytesUpload

    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(_service(config).plan(request_, BytesUpload(_png_header(2000, 1500))))
    assert info.value.param == "image" and needle in info.value.message


def test_an_edit_with_a_size_takes_a_larger_image_than_its_output(config):
    import asyncio

    from serve_app.service.uploads import BytesUpload

    # Within max_upload_pixels the image is read and resized to the size asked for; cut
    # short, this one fails only when decoded.
    with pytest.raises(InvalidRequestError, match="could not be decoded"):
        asyncio.run(_service(config).plan(ImageRequest(task="edit", prompt="a", size="512x512"),
                                          BytesUpload(_png_header(2000, 1500))))


def test_a_mask_of_another_size_is_refused_before_it_is_decoded(config):
    import asyncio
    import io

    from PIL import Image

    from serve_app.service.uploads import BytesUpload

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "PNG")
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(_service(config).plan(ImageRequest(task="edit", prompt="a"),
                                          BytesUpload(buffer.getvalue()),
                                          BytesUpload(_png_header(128, 64))))
    assert info.value.param == "mask" and "same size" in info.value.message


def test_decodes_wait_their_turn_past_the_configured_number(tiny_args, monkeypatch):
    import asyncio
    import threading
    import time

    from serve_app.service import images
    from serve_app.service.uploads import BytesUpload

    args = {**{k: v for k, v in tiny_args.items() if k != "safety"},
            "ingress": {**tiny_args.get("ingress", {}), "max_concurrent_decodes": 2}}
    service = _service(load_app_config(args))
    lock, running, most = threading.Lock(), [0], [0]

    def slow_decode(data, param, rule):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return np.zeros((64, 64, 3), np.uint8)

    monkeypatch.setattr(images, "decode_image", slow_decode)

    async def many():
        request = ImageRequest(task="edit", prompt="a")
        await asyncio.gather(*(service.plan(request, BytesUpload(b"x")) for _ in range(8)))

    asyncio.run(many())
    assert most[0] == 2
