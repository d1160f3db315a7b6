"""Stability's gRPC front (serve_app/fronts/stability.py) without Ray: Requests built as
stability-sdk 0.8.6 builds them (its client.py: generate() and upscale()), converted, checked
and answered through the images service on fake handles."""

import asyncio
import io

import grpc
import numpy as np
import pytest
from PIL import Image

from deployments.families import FAMILIES
from serve_app.config import load_app_config
from serve_app.fronts import stability
from serve_app.fronts.gooseai import generation_pb2 as generation
from serve_app.service.images import ImagesService
from serve_app.service.planning import plan_request
from serve_app.service.uploads import decode_keep_mask
from serve_app.tools.launch import load_serve_config
from tests.conftest import REPO_ROOT
from tests.unit.fakes import FakeHandle, FakeSafetyHandle, fake_handles

CONFIGS = ["tiny", "local-gpu", "cluster"]


@pytest.fixture
def config(tiny_args):
    return load_app_config(tiny_args)


@pytest.fixture
def plain(tiny_args):
    """The tiny app without its safety checker: the fakes' errors reach the service."""
    return load_app_config({k: v for k, v in tiny_args.items() if k != "safety"})


def png(width=64, height=48, color=(200, 10, 10), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_prompt(data: bytes, kind=generation.ARTIFACT_IMAGE):
    return generation.Prompt(artifact=generation.Artifact(type=kind, binary=data))


def sdk_generate(prompt="a cat", engine="stable-diffusion-2-1", init=None, mask=None, height=512,
                 width=512, start=1.0, cfg_scale=7.0, sampler=None, steps=None, seed=(), samples=1):
    """The Request stability-sdk's StabilityInference.generate() sends."""
    prompts = [generation.Prompt(text=prompt)] if isinstance(prompt, str) else list(prompt)
    step = dict(scaled_step=0, sampler=generation.SamplerParameters(cfg_scale=cfg_scale))
    if init is not None:
        step["schedule"] = generation.ScheduleParameters(start=start, end=0.01)
        prompts.append(image_prompt(init))
        if mask is not None:
            prompts.append(image_prompt(mask, generation.ARTIFACT_MASK))
    params = generation.ImageParameters(
        transform=generation.TransformType(diffusion=sampler) if sampler is not None else None,
        height=height, width=width, seed=list(seed), steps=steps, samples=samples,
        adapter=generation.T2IAdapterParameter(adapter_strength=0.4),
        parameters=[generation.StepParameter(**step)],
    )
    return generation.Request(engine_id=engine, request_id="r-1", prompt=prompts, image=params)


def sdk_upscale(init: bytes, engine="esrgan-v1-x2plus", width=None, height=None, prompt=None,
                steps=20, cfg_scale=7.0, seed=0):
    """The Request stability-sdk's StabilityInference.upscale() sends."""
    params = generation.ImageParameters(
        height=height, width=width, seed=[seed], steps=steps,
        parameters=[generation.StepParameter(sampler=generation.SamplerParameters(cfg_scale=cfg_scale))])
    prompts = [image_prompt(init)] + ([generation.Prompt(text=prompt)] if prompt else [])
    return generation.Request(engine_id=engine, request_id="r-2", prompt=prompts, image=params)


def refused(request, config, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(stability.StabilityError) as info:
        stability.to_job(request, config)
    assert info.value.code == code
    return info.value.message


# --- configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_serves_the_api_on_9000_with_stabilitys_engine_ids(name):
    from ray.serve.config import gRPCOptions

    serve_config = load_serve_config(REPO_ROOT / "configs" / f"{name}.yaml")
    options = gRPCOptions(**serve_config["grpc_options"])
    assert options.port == 9000
    (add_servicer,) = options.grpc_servicer_func_callable
    assert add_servicer.__name__ == "add_GenerationServiceServicer_to_server"
    config = load_app_config(serve_config["applications"][0]["args"])
    families = {"esrgan-v1-x2plus": "esrgan", "stable-diffusion-x4-latent-upscaler": "sd-x4-upscaler",
                "stable-diffusion-xl-1024-v1-0": "sdxl", "stable-diffusion-768-v2-1": "sd21",
                "stable-diffusion-512-v2-1": "sd21"}
    for engine, family in families.items():
        assert config.resolve(engine).family == family, (name, engine)


def test_the_generated_code_is_what_the_proto_generates():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "generate_grpc.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_wire_names_and_numbers_are_stabilitys():
    """A few of the numbers the SDK's own generated code uses (stability-sdk 0.8.6)."""
    fields = generation.Request.DESCRIPTOR.fields_by_name
    assert (fields["engine_id"].number, fields["prompt"].number, fields["image"].number,
            fields["extras"].number) == (1, 4, 5, 2047)
    image = generation.ImageParameters.DESCRIPTOR.fields_by_name
    assert (image["seed"].number, image["samples"].number, image["adapter"].number) == (3, 4, 12)
    artifact = generation.Artifact.DESCRIPTOR.fields_by_name
    assert (artifact["binary"].number, artifact["finish_reason"].number, artifact["seed"].number) == (5, 9, 10)
    assert (generation.FILTER, generation.ARTIFACT_IMAGE, generation.ARTIFACT_MASK) == (4, 1, 7)
    service = generation.DESCRIPTOR.services_by_name["GenerationService"]
    assert service.full_name == "gooseai.GenerationService"
    assert service.methods_by_name["Generate"].output_type.full_name == "gooseai.Answer"


def test_each_family_names_the_scheduler_its_real_config_runs():
    assert FAMILIES["sd21"].scheduler == "DDIMScheduler"
    assert FAMILIES["sdxl"].scheduler == "EulerDiscreteScheduler"
    assert FAMILIES["esrgan"].scheduler is None


# --- upscale ----------------------------------------------------------------------------


def test_esrgan_upscale_ignores_the_diffusion_fields_as_the_document_says(config):
    job = stability.to_job(sdk_upscale(png(), prompt="ignored", seed=42), config)
    req = job.request
    assert (req.task, req.model, req.width, req.height) == ("upscale", "esrgan-v1-x2plus", None, None)
    assert (req.prompt, req.num_inference_steps, req.guidance_scale) == ("", None, None)
    assert job.image == png() and job.mask is None


def test_x4_upscale_takes_prompt_seed_steps_and_cfg_scale_with_the_documents_defaults(config):
    request = sdk_upscale(png(), "stable-diffusion-x4-latent-upscaler", width=256, prompt="a red car",
                          seed=7, steps=30, cfg_scale=9.0)
    req = stability.to_job(request, config).request
    assert (req.width, req.height, req.prompt, req.seed) == (256, None, "a red car", 7)
    assert (req.num_inference_steps, req.guidance_scale) == (30, 9.0)
    bare = generation.Request(engine_id="stable-diffusion-x4-latent-upscaler", prompt=[image_prompt(png())])
    req = stability.to_job(bare, config).request
    assert (req.num_inference_steps, req.guidance_scale) == (20, 7.0)


@pytest.mark.parametrize("change, field", [
    (dict(width=256, height=256), "image.width"),
    (dict(steps=51), "image.steps"),
])
def test_upscale_refuses_what_the_document_forbids(config, change, field):
    message = refused(sdk_upscale(png(), "stable-diffusion-x4-latent-upscaler", **change), config)
    assert message.startswith(f"{field}:"), message


def test_upscale_needs_an_image_and_takes_no_mask(config):
    no_image = generation.Request(engine_id="esrgan-v1-x2plus", prompt=[generation.Prompt(text="x")])
    assert "ARTIFACT_IMAGE" in refused(no_image, config)
    with_mask = sdk_upscale(png())
    with_mask.prompt.append(image_prompt(png(), generation.ARTIFACT_MASK))
    assert refused(with_mask, config).startswith("prompt[1].artifact:")


# --- generate ---------------------------------------------------------------------------


def test_text_to_image_as_the_sdk_sends_it(config):
    req = stability.to_job(sdk_generate(seed=[5], samples=3, steps=8, cfg_scale=6.0), config).request
    assert (req.task, req.prompt, req.size, req.n, req.seed) == ("generate", "a cat", "512x512", 3, 5)
    assert (req.num_inference_steps, req.guidance_scale, req.strength) == (8, 6.0, None)


def test_a_negative_weight_makes_the_negative_prompt(config):
    prompts = [generation.Prompt(text="a castle"),
               generation.Prompt(text="fog", parameters=generation.PromptParameters(weight=-1.0))]
    req = stability.to_job(sdk_generate(prompts), config).request
    assert (req.prompt, req.negative_prompt) == ("a castle", "fog")


@pytest.mark.parametrize("prompts, field", [
    ([generation.Prompt(text="a", parameters=generation.PromptParameters(weight=0.5))], "prompt[0].parameters.weight"),
    ([generation.Prompt(text="a"), generation.Prompt(text="b")], "prompt"),
    ([generation.Prompt(tokens=generation.Tokens())], "prompt[0].tokens"),
    ([generation.Prompt()], "prompt[0]"),
])
def test_prompts_that_would_be_served_otherwise_than_asked_are_refused(config, prompts, field):
    assert refused(sdk_generate(prompts), config).startswith(f"{field}:")


def test_a_seed_per_sample_is_kept_and_a_missing_seed_is_drawn(config):
    req = stability.to_job(sdk_generate(seed=[7, 99], samples=2), config).request
    assert (req.n, req.seed, req.seeds) == (2, None, (7, 99))
    # No seed (0): the images service draws it, as for every front, within the uint32 seeds.
    unseeded = stability.to_job(sdk_generate(seed=[0], samples=4), config).request
    assert (unseeded.seed, unseeded.seeds) == (None, ())
    drawn = plan_request(unseeded, config).seeds
    assert len(drawn) == 4 and 0 <= drawn[0] and drawn[-1] <= stability.SEED_LIMIT - 1
    assert refused(sdk_generate(seed=[1, 2, 3], samples=2), config).startswith("image.seed:")
    assert refused(sdk_generate(seed=[2**32 - 2], samples=4), config).startswith("image.seed:")


def test_image_to_image_and_inpainting_take_start_schedule_as_strength(config):
    job = stability.to_job(sdk_generate(init=png(512, 512), start=0.6), config)
    assert (job.request.task, job.request.strength) == ("edit", pytest.approx(0.6))
    inpaint = stability.to_job(sdk_generate(init=png(512, 512), mask=png(512, 512, 0, "L")), config)
    assert inpaint.mask is not None and inpaint.request.strength == 1.0


@pytest.mark.parametrize("sampler, ok", [(generation.SAMPLER_DDIM, True), (generation.SAMPLER_K_EULER, False)])
def test_the_sampler_must_be_the_engines_own(config, sampler, ok):
    request = sdk_generate(sampler=sampler)
    if ok:
        stability.to_job(request, config)
    else:
        message = refused(request, config)
        assert message.startswith("image.transform.diffusion:") and "SAMPLER_DDIM" in message
    sdxl = sdk_generate(engine="stable-diffusion-xl-1024-v1-0", height=1024, width=1024,
                        sampler=generation.SAMPLER_K_EULER)
    stability.to_job(sdxl, config)


def _with(request, mutate):
    mutate(request)
    return request


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.image.parameters[0].guidance.CopyFrom(
        generation.GuidanceParameters(guidance_preset=generation.GUIDANCE_PRESET_SLOW)),
     "image.parameters[0].guidance"),
    (lambda r: setattr(r.image.adapter, "adapter_type", generation.T2IADAPTER_CANNY),
     "image.adapter.adapter_type"),
    (lambda r: r.extras.update({"$IPC": {"preset": "anime"}}), "extras"),
    (lambda r: setattr(r, "requested_type", generation.ARTIFACT_TEXT), "requested_type"),
    (lambda r: r.MergeFromString(b"\x32\x00"), "6"),  # ConditionerParameters (field 6)
    (lambda r: r.image.ClearField("width"), "image.width"),  # the one missing
    (lambda r: setattr(r.image.parameters[0].sampler, "eta", 0.5), "image.parameters[0].sampler.eta"),
    (lambda r: r.image.parameters[0].schedule.CopyFrom(generation.ScheduleParameters(start=0.5)),
     "image.parameters[0].schedule"),
    (lambda r: setattr(r.image, "samples", 11), "image.samples"),
    (lambda r: setattr(r, "engine_id", ""), "engine_id"),
    (lambda r: setattr(r, "requested_type", 99), "requested_type"),  # a number we do not know
    (lambda r: setattr(r.image, "width", 100000), "image.width"),
    (lambda r: (setattr(r.image, "width", 0), setattr(r.image, "height", 0)), "image.width"),
    (lambda r: setattr(r.image, "steps", 0), "image.steps"),
    (lambda r: setattr(r.image.parameters[0].sampler, "cfg_scale", float("nan")),
     "image.parameters[0].sampler.cfg_scale"),
    (lambda r: setattr(r.image.parameters[0].sampler, "cfg_scale", 51), "image.parameters[0].sampler.cfg_scale"),
    (lambda r: setattr(r.image.parameters[0].sampler, "cfg_scale", -1), "image.parameters[0].sampler.cfg_scale"),
    (lambda r: setattr(r.image.parameters[0], "scaled_step", 5), "image.parameters[0].scaled_step"),
    (lambda r: setattr(r.prompt[0], "text", "  "), "prompt"),
])
def test_fields_not_served_are_refused_by_name(config, mutate, field):
    assert refused(_with(sdk_generate(), mutate), config).startswith(f"{field}:")


def test_upscale_and_mask_fields_that_would_be_ignored_are_refused(config):
    with_schedule = sdk_upscale(png(), "stable-diffusion-x4-latent-upscaler")
    with_schedule.image.parameters[0].schedule.start = 0.3
    assert refused(with_schedule, config).startswith("image.parameters[0].schedule:")
    narrow = sdk_upscale(png(), width=7)
    assert refused(narrow, config).startswith("image.width:")
    weighted_image = sdk_upscale(png())
    weighted_image.prompt[0].parameters.weight = 0.5
    assert refused(weighted_image, config).startswith("prompt[0].parameters:")
    unknown_type = sdk_upscale(png())
    unknown_type.prompt[0].artifact.type = 42
    assert refused(unknown_type, config).startswith("prompt[0].artifact.type: 42")
    # MASKED_AREA_INIT_ZERO (what the SDK's api.Context.inpaint sends): noise alone, at
    # start_schedule 1; below 1 the masked area starts from the init image.
    zero = sdk_generate(init=png(512, 512), mask=png(512, 512, 0, "L"))
    zero.image.masked_area_init = generation.MASKED_AREA_INIT_ZERO
    stability.to_job(zero, config)
    zero.image.parameters[0].schedule.start = 0.5
    assert refused(zero, config).startswith("image.masked_area_init:")


def test_init_image_fields_are_checked_by_name(config):
    with_end = _with(sdk_generate(init=png(512, 512)), lambda r: setattr(r.image.parameters[0].schedule, "end", 0.5))
    assert refused(with_end, config).startswith("image.parameters[0].schedule.end:")
    zero = sdk_generate(init=png(512, 512), start=0.0)
    assert refused(zero, config).startswith("image.parameters[0].schedule.start:")
    depth = sdk_generate(init=png(512, 512))
    depth.prompt[1].artifact.type = generation.ARTIFACT_DEPTH
    assert refused(depth, config).startswith("prompt[1].artifact.type:")
    text = sdk_generate(init=png(512, 512))
    text.prompt[1].artifact.text = "not bytes"
    assert refused(text, config).startswith("prompt[1].artifact.binary:")
    both = sdk_generate(init=png(512, 512), mask=png(512, 512, 0, "L"))
    config.ingress.max_upload_bytes = len(png(512, 512)) + 10  # the image fits, not with the mask
    message = refused(both, config)
    assert message.startswith("prompt[2].artifact.binary:") and f"limit of {config.ingress.max_upload_bytes}" in message


def test_an_unknown_engine_is_not_found_and_lists_the_engines(config):
    message = refused(sdk_generate(engine="stable-diffusion-v9"), config, grpc.StatusCode.NOT_FOUND)
    assert message.startswith("engine_id:") and "stable-diffusion-2-1" in message


# --- keys -------------------------------------------------------------------------------


def test_api_keys_come_from_the_authorization_metadata():
    keys = (b"sk-one",)
    stability.authenticate([], ())  # keys off: anything goes
    stability.authenticate([("authorization", "Bearer sk-one")], keys)
    for metadata in ([], [("authorization", "Bearer sk-two")], [("authorization", "sk-one")]):
        with pytest.raises(stability.StabilityError) as info:
            stability.authenticate(metadata, keys)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.message.startswith("authorization metadata:")


# --- through the images service ---------------------------------------------------------


def run(service, request, metadata=(), keys=()):
    async def collect():
        return [a async for a in stability.generate(service, keys, request, metadata)]

    return asyncio.run(collect())


def test_answers_carry_one_png_artifact_each_with_seed_and_index(plain):
    answers = run(ImagesService(plain, fake_handles(plain)), sdk_generate(seed=[10, 20], samples=2))
    assert sorted(a.artifacts[0].index for a in answers) == [0, 1]
    for answer in answers:
        (artifact,) = answer.artifacts
        assert (artifact.type, artifact.mime, artifact.finish_reason) == (
            generation.ARTIFACT_IMAGE, "image/png", generation.NULL)
        assert artifact.seed == [10, 20][artifact.index] and artifact.size == len(artifact.binary)
        image = Image.open(io.BytesIO(artifact.binary))
        assert (image.format, image.size) == ("PNG", (512, 512))
        assert image.getpixel((3, 3))[0] == artifact.seed % 256  # the fake's gray level per seed
        assert answer.request_id == "r-1" and answer.meta.engine_id == "stable-diffusion-2-1"


def test_a_seed_per_sample_is_one_plan_within_the_models_limits(plain):
    handles = fake_handles(plain)
    answers = run(ImagesService(plain, handles), sdk_generate(seed=[10, 20, 7], samples=3))
    assert [(a.artifacts[0].index, a.artifacts[0].seed) for a in answers] == [(0, 10), (1, 20), (2, 7)]
    assert len(handles["stable-diffusion-2-1"].calls) == 1  # one job of three images
    plain.models[0].limits.max_n = 2
    with pytest.raises(stability.StabilityError) as info:
        run(ImagesService(plain, fake_handles(plain)), sdk_generate(seed=[1, 2, 3], samples=3))
    assert info.value.message.startswith("image.samples:"), info.value.message


def test_a_flagged_image_comes_back_blurred_with_finish_reason_filter(config):
    handles = fake_handles(config, SafetyChecker=FakeSafetyHandle(flagged={1}))
    answers = run(ImagesService(config, handles), sdk_generate(seed=[3], samples=2))
    reasons = {a.artifacts[0].index: a.artifacts[0].finish_reason for a in answers}
    assert reasons == {0: generation.NULL, 1: generation.FILTER}
    flagged = next(a.artifacts[0] for a in answers if a.artifacts[0].index == 1)
    assert Image.open(io.BytesIO(flagged.binary)).getpixel((3, 3)) == (128, 128, 128)


def test_the_mask_is_read_in_stabilitys_convention(config):
    handles = fake_handles(config)
    mask = np.full((512, 512), 255, np.uint8)
    mask[:, :256] = 0  # black: change the left half
    buffer = io.BytesIO()
    Image.fromarray(mask, "L").save(buffer, format="PNG")
    run(ImagesService(config, handles), sdk_generate(init=png(512, 512), mask=buffer.getvalue(), seed=[1]))
    (call,) = handles["stable-diffusion-2-1"].calls
    weights = call.args[2]
    assert weights[:, :256].min() == 255 and weights[:, 256:].max() == 0


def test_decode_keep_mask_black_changes_white_keeps():
    weights = decode_keep_mask(png(4, 4, 0, "L"), "mask", 10**6)
    assert weights.dtype == np.uint8 and weights.min() == 255
    from serve_app.protocol.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="nothing to change"):
        decode_keep_mask(png(4, 4, 255, "L"), "mask", 10**6)


@pytest.mark.parametrize("request_, code, field", [
    (sdk_generate(height=1024, width=1024), grpc.StatusCode.INVALID_ARGUMENT, "image.width"),
    (sdk_generate(init=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "prompt[1].artifact"),
    (sdk_upscale(png(1100, 1000)), grpc.StatusCode.INVALID_ARGUMENT, "prompt[0].artifact"),
    (sdk_generate(steps=101), grpc.StatusCode.INVALID_ARGUMENT, "image.steps"),
])
def test_the_services_own_checks_name_stabilitys_fields(config, request_, code, field):
    with pytest.raises(stability.StabilityError) as info:
        run(ImagesService(config, fake_handles(config)), request_)
    assert info.value.code == code and info.value.message.startswith(f"{field}:"), info.value.message


def test_server_faults_are_statuses_without_a_traceback(plain):
    from ray.serve.exceptions import BackPressureError

    config = plain
    broken = fake_handles(config, **{"stable-diffusion-2-1": FakeHandle("stable-diffusion-2-1", error=RuntimeError("boom"))})
    with pytest.raises(stability.StabilityError) as info:
        run(ImagesService(config, broken), sdk_generate())
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "boom" not in info.value.message and "Traceback" not in info.value.message
    full = fake_handles(config, **{"stable-diffusion-2-1": FakeHandle(
        "stable-diffusion-2-1", error=BackPressureError(num_queued_requests=4, max_queued_requests=4))})
    with pytest.raises(stability.StabilityError) as info:
        run(ImagesService(config, full), sdk_generate())
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_past_the_request_timeout_is_deadline_exceeded(plain):
    config = plain
    config.ingress.request_timeout_s = 0.2
    slow = fake_handles(config, **{"stable-diffusion-2-1": FakeHandle("stable-diffusion-2-1", delay_s=5)})
    with pytest.raises(stability.StabilityError) as info:
        run(ImagesService(config, slow), sdk_generate())
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_keys_are_checked_before_anything_else(config):
    with pytest.raises(stability.StabilityError) as info:
        run(ImagesService(config, fake_handles(config)), sdk_generate(engine="nope"), keys=(b"sk",))
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_the_status_error_survives_pickling_to_the_proxy():
    import pickle

    error = pickle.loads(pickle.dumps(stability.StabilityError(grpc.StatusCode.NOT_FOUND, "engine_id: x")))
    assert (error.code, error.message, str(error)) == (grpc.StatusCode.NOT_FOUND, "engine_id: x", "engine_id: x")


def _profile(name: str):
    return load_serve_config(REPO_ROOT / "configs" / f"{name}.yaml")


def _largest_answer(name: str) -> int:
    """Bytes of the largest answer a config can return: one image at its largest output, as
    an unfiltered PNG at worst (3 bytes a pixel, a filter byte a row, chunk overhead)."""
    from serve_app.protocol.sizes import output_pixels

    config = load_app_config(_profile(name)["applications"][0]["args"])
    largest = max(m.max_output_pixels if "upscale" in m.capabilities else output_pixels(m.limits)
                  for m in config.models)
    assert largest >= 1024 * 1024
    return largest * 3 + 16384 + 64 * 1024


@pytest.mark.parametrize("name", ["tiny", "local-gpu", "cluster"])
def test_every_profile_bounds_the_grpc_message_by_its_largest_request_and_answer(name):
    """Serve's proxy reads a whole message before the front can refuse it (Ray's default
    limit is 2 GiB): every profile lowers the limit, through the controller (which passes
    it to the proxies), to what its uploads and answers need, and not far above."""
    serve_config = _profile(name)
    config = load_app_config(serve_config["applications"][0]["args"])
    env = serve_config["controller_options"]["runtime_env"]["env_vars"]
    limit = int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"])
    need = config.grpc_message_bytes
    assert need >= config.ingress.max_upload_bytes + 2**20 and need >= _largest_answer(name)
    assert need <= limit <= 2 * need, (name, need, limit)


def test_the_clusters_nodes_set_the_same_message_limit():
    """On KubeRay every node's proxy gets the limit from its environment too (a proxy the
    controller did not start, after a head restart, still has it)."""
    import yaml

    manifest = yaml.safe_load((REPO_ROOT / "k8s" / "rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    limits = {int(env["value"]) for group in groups for container in group["template"]["spec"]["containers"]
              for env in container.get("env", []) if env["name"] == "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"}
    profile = _profile("cluster")["controller_options"]["runtime_env"]["env_vars"]
    assert limits == {int(profile["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"])}


def test_planning_takes_a_seed_per_image(config):
    from serve_app.protocol.errors import InvalidRequestError
    from serve_app.service.planning import plan_request
    from serve_app.protocol.request import ImageRequest

    plan = plan_request(ImageRequest(task="generate", prompt="x", n=2, seeds=(5, 1)), config)
    assert plan.seeds == (5, 1)
    for wrong in (dict(n=3, seeds=(5, 1)), dict(n=2, seeds=(5, 1), seed=3), dict(n=1, seeds=(-1,))):
        with pytest.raises(InvalidRequestError):
            plan_request(ImageRequest(task="generate", prompt="x", **wrong), config)
