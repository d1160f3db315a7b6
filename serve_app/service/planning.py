"""Request planning: which deployments run a request, in what order, with which jobs.

A plan is built and checked against the models' limits before any model work starts;
planning only builds and checks plans (serve_app/execution.py runs them). Every route's
request arrives as one :class:`~serve_app.service.request.ImageRequest`.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from deployments.families import hands_latents
from deployments.sources import Source
from deployments.contract import (
    ImageToImageJob,
    LoraRef,
    RefineJob,
    SafetyJob,
    TextToImageJob,
    UpscaleJob,
)
from serve_app.config import SAFETY_NAME, AppConfig, ModelConfig, RefinerChainConfig
from serve_app.service.errors import InvalidRequestError, ModelNotFoundError
from serve_app.service.request import ImageRequest, MAX_SEED, parse_size

# A Hub repository id: owner/name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Seeds drawn for requests without one stay in 32 bits, like the seeds other services show.
_DRAWN_SEED_LIMIT = 2**32


def draw_seed() -> int:
    return secrets.randbelow(_DRAWN_SEED_LIMIT)


SeedSource = Callable[[], int]


@dataclass(frozen=True)
class Stage:
    """One handle call: ``handles[deployment].run.remote(job, *inputs | <previous>)``; the
    job's type says what the deployment does with it (deployments/contract.py).

    ``inputs`` (decoded uploads, at their own size) are given to the first stage only;
    every later stage gets the previous stage's response instead.
    """

    deployment: str
    job: Any
    inputs: tuple = ()


@dataclass(frozen=True)
class GenerationPlan:
    model: str
    width: int
    height: int
    seeds: tuple[int, ...]
    stages: tuple[Stage, ...]
    output_format: str
    output_compression: int | None
    response_format: str = "b64_json"
    stream: bool = False
    partial_images: int = 0
    # The safety check after the last stage (None: no checker configured); a flagged image
    # fails the request when ``reject_flagged``, naming ``moderation_param``.
    safety: SafetyJob | None = None
    reject_flagged: bool = False
    moderation_param: str = "prompt"

    @property
    def check_previews(self) -> bool:
        """Streamed previews go through the checker too when flagged images must not be
        seen as made (policy blur or reject)."""
        return self.safety is not None and (self.safety.blur or self.reject_flagged)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def deployments(self) -> tuple[str, ...]:
        """The deployments this plan calls, in order (the safety checker last)."""
        return tuple(stage.deployment for stage in self.stages) + ((SAFETY_NAME,) if self.safety else ())


def _resolve(config: AppConfig, name: str | None, default: str | None = None):
    served = config.resolve(name, default)
    if served is None:
        raise ModelNotFoundError(name or default or "", config.served_names())
    return served


def _seeds(seed: int | None, n: int, seed_source: SeedSource) -> tuple[int, ...]:
    if seed is not None and seed + n - 1 > MAX_SEED:
        raise InvalidRequestError(f"seed + n - 1 must be at most {MAX_SEED}", param="seed")
    first = seed if seed is not None else seed_source()
    return tuple(first + i for i in range(n))


def steps_run(steps: int, strength: float) -> int:
    """Denoising steps an image-to-image or inpainting call runs: the last
    ``int(steps * strength)`` of the schedule (diffusers' ``get_timesteps``, same arithmetic)."""
    return min(int(steps * strength), steps)


def check_request_limits(req: ImageRequest, config: AppConfig) -> None:
    """The ingress's own limits, before any model is looked up: prompt lengths."""
    limit = config.ingress.max_prompt_chars
    texts = [("prompt", req.prompt), ("negative_prompt", req.negative_prompt)]
    texts += [("prompt", v) for v in req.more_prompts]
    texts += [("negative_prompt", v) for v in req.more_negative_prompts]
    for param, value in texts:
        if value is not None and len(value) > limit:
            raise InvalidRequestError(
                f"'{param}' is {len(value)} characters; the limit is {limit}.", param=param
            )


def _with_stream(plan: GenerationPlan, req: ImageRequest) -> GenerationPlan:
    """Streaming settings, checked: previews come from one denoising stage and one image."""
    stream, partial = req.stream, req.partial_images
    if partial is not None and not stream:
        raise InvalidRequestError("partial_images needs stream: true", param="partial_images")
    if not stream:
        return plan
    if len(plan.stages) > 1:
        raise InvalidRequestError(
            "stream works for one model at a time, not refiner chains or upscale", param="stream"
        )
    if len(plan.seeds) > 1:
        raise InvalidRequestError("stream returns one image: set n to 1", param="n")
    return dataclasses.replace(plan, stream=True, partial_images=partial or 0)


def _with_safety(plan: GenerationPlan, req: ImageRequest, config: AppConfig, param: str) -> GenerationPlan:
    """Add the safety check the server's policy and the request's ``moderation`` ask for."""
    safety, moderation = config.safety, req.moderation
    if safety is None:
        return plan
    if moderation == "low" and not safety.allow_low:
        raise InvalidRequestError(
            "moderation 'low' is not allowed on this server; use 'auto'", param="moderation"
        )
    strict = moderation == "auto"
    return dataclasses.replace(
        plan,
        safety=SafetyJob(blur=strict and safety.policy == "blur"),
        reject_flagged=strict and safety.policy == "reject",
        moderation_param=param,
    )


def _check_total_pixels(plan: GenerationPlan, config: AppConfig) -> GenerationPlan:
    total, limit = len(plan.seeds) * plan.width * plan.height, config.ingress.max_request_pixels
    if total > limit:
        raise InvalidRequestError(
            f"n x width x height = {len(plan.seeds)} x {plan.width} x {plan.height} = {total} output "
            f"pixels; the limit per request is {limit}. Ask for fewer or smaller images.",
            param="n",
        )
    return plan


def _check_common(req, served: ModelConfig | RefinerChainConfig, check_steps: bool = True) -> int:
    """Checks every route shares; returns the number of denoising steps."""
    limits, defaults = served.limits, served.defaults
    if req.n > limits.max_n:
        raise InvalidRequestError(
            f"{req.n} images per request is above {served.name}'s limit of {limits.max_n}",
            param="n",
        )
    steps = req.num_inference_steps or defaults.num_inference_steps
    if check_steps and steps > limits.max_steps:
        raise InvalidRequestError(
            f"{steps} denoising steps is above {served.name}'s limit of {limits.max_steps}",
            param="num_inference_steps",
        )
    if req.output_compression is not None and req.output_format == "png":
        raise InvalidRequestError(
            "output_compression applies to the jpeg and webp output formats only",
            param="output_compression",
        )
    return steps


def _guidance(req, served) -> float:
    return req.guidance_scale if req.guidance_scale is not None else served.defaults.guidance_scale


def _negative(req, served) -> str | None:
    return req.negative_prompt if req.negative_prompt is not None else served.defaults.negative_prompt


def _require(served, capability: str, what: str, param: str = "model") -> ModelConfig:
    if not isinstance(served, ModelConfig) or capability not in served.capabilities:
        raise InvalidRequestError(f"{served.name} does not {what}", param=param)
    return served


def _upscale_stage(
    config: AppConfig,
    name: str,
    prompt: str,
    negative_prompt: str | None,
    seeds: tuple[int, ...],
    width: int,
    height: int,
) -> tuple[Stage, ModelConfig]:
    """The stage that upscales a generation's or edit's output (extension ``upscale``)."""
    upscaler = config.resolve(name)
    if upscaler is None or not isinstance(upscaler, ModelConfig) or "upscale" not in upscaler.capabilities:
        known = [m.name for m in config.models if "upscale" in m.capabilities]
        raise InvalidRequestError(
            f"upscale={name!r} is not an upscaler; available: {', '.join(known) or 'none'}",
            param="upscale",
        )
    limit = upscaler.limits.max_input_pixels
    if width * height > limit:
        raise InvalidRequestError(
            f"{upscaler.name} takes at most {limit} input pixels; {width}x{height} is "
            f"{width * height}. Ask for a smaller size or another upscaler.",
            param="upscale",
        )
    if len(seeds) > upscaler.limits.max_n:
        raise InvalidRequestError(
            f"{upscaler.name} upscales at most {upscaler.limits.max_n} images per request",
            param="n",
        )
    defaults = upscaler.defaults
    job = UpscaleJob(
        prompt,
        negative_prompt,
        defaults.num_inference_steps,
        defaults.guidance_scale,
        seeds,
        noise_level=defaults.noise_level,
    )
    return Stage(upscaler.name, job), upscaler


def _with_upscale(
    config: AppConfig,
    name: str | None,
    stages: list[Stage],
    prompt: str,
    negative_prompt: str | None,
    seeds: tuple[int, ...],
    width: int,
    height: int,
) -> tuple[tuple[Stage, ...], int, int]:
    """Append an upscale stage when asked. Latents are handed over where the upscaler
    takes latents of the same latent space (SD 2.1 -> x2 latent), so the previous stage
    skips its VAE decode; from any other space (SDXL -> x2) images go over."""
    if name is None:
        return tuple(stages), width, height
    stage, upscaler = _upscale_stage(config, name, prompt, negative_prompt, seeds, width, height)
    last = stages[-1]
    if hands_latents(config.model(last.deployment).family, upscaler.family):
        stages[-1] = dataclasses.replace(last, job=dataclasses.replace(last.job, output_latents=True))
    factor = upscaler.upscale_factor
    return (*stages, stage), width * factor, height * factor


def plan_generation(
    req: ImageRequest,
    config: AppConfig,
    seed_source: SeedSource = draw_seed,
) -> GenerationPlan:
    """Check ``req`` against its model and build the stages that answer it.

    Raises :class:`ModelNotFoundError` (404) or :class:`InvalidRequestError` (400) before
    any model work.
    """
    check_request_limits(req, config)
    served = _resolve(config, req.model)
    if isinstance(served, ModelConfig):
        _require(served, "text-to-image", "generate images from text" + _chain_hint(config, served))
    steps = _check_common(req, served)
    defaults = served.defaults
    size = defaults.size if req.size in (None, "auto") else req.size
    width, height = parse_size(size)
    if not served.limits.allows(width, height):
        raise InvalidRequestError(
            f"{width}x{height} (width x height) is not a size {served.name} makes; allowed: "
            f"{served.limits.describe_sizes()}",
            param="size",
        )
    guidance, negative = _guidance(req, served), _negative(req, served)
    seeds = _seeds(req.seed, req.n, seed_source)
    second = _second_prompts(req, config, served)
    # Adapters apply to the stage they were made for: the base of a refiner chain.
    loras = lora_refs(req, config.prompted_model(served))

    if isinstance(served, RefinerChainConfig):
        frac = req.high_noise_frac if req.high_noise_frac is not None else defaults.high_noise_frac
        # Both experts must get at least one step, or one of them silently does nothing.
        if min(steps * frac, steps * (1 - frac)) < 1 - 1e-6:
            raise InvalidRequestError(
                f"num_inference_steps={steps} with high_noise_frac={frac} leaves one of base and "
                "refiner without a denoising step; raise num_inference_steps or move "
                "high_noise_frac towards 0.5",
                param="num_inference_steps",
            )
        stages = [
            Stage(
                served.base,
                TextToImageJob(req.prompt, negative, width, height, steps, guidance, seeds,
                               denoising_end=frac, output_latents=True, loras=loras, **second),
            ),
            Stage(
                served.refiner,
                RefineJob(req.prompt, negative, steps, guidance, seeds, denoising_start=frac),
            ),
        ]
    else:
        if req.high_noise_frac is not None:
            raise InvalidRequestError(
                f"high_noise_frac applies to refiner chains only, not to {served.name}",
                param="high_noise_frac",
            )
        stages = [
            Stage(
                served.name,
                TextToImageJob(req.prompt, negative, width, height, steps, guidance, seeds,
                               loras=loras, **second),
            )
        ]
    all_stages, out_w, out_h = _with_upscale(
        config, req.upscale, stages, req.prompt, negative, seeds, width, height
    )
    plan = GenerationPlan(served.name, out_w, out_h, seeds, all_stages, req.output_format,
                          req.output_compression, req.response_format)
    return _with_safety(_with_stream(_check_total_pixels(plan, config), req), req, config, "prompt")


def _second_prompts(req: ImageRequest, config: AppConfig, served) -> dict[str, str | None]:
    """``prompt_2`` / ``negative_prompt_2`` of the job: the further prompts of a request
    ('first | second' on Livepeer's route), refused for a model with fewer text encoders."""
    model = config.prompted_model(served)
    room = max(model.info.text_encoders - 1, 0)
    for param, more in (("prompt", req.more_prompts), ("negative_prompt", req.more_negative_prompts)):
        if len(more) > room:
            raise InvalidRequestError(
                f"{len(more) + 1} prompts separated by '|', but {served.name} has "
                f"{model.info.text_encoders} text encoder{'s' if room else ''}: send at most "
                f"{room + 1}",
                param=param,
            )
    return {"prompt_2": req.more_prompts[0] if req.more_prompts else None,
            "negative_prompt_2": req.more_negative_prompts[0] if req.more_negative_prompts else None}


def lora_refs(req: ImageRequest, model: ModelConfig) -> tuple[LoraRef, ...]:
    """The adapters ``req`` names, resolved against ``model``'s config: each a configured
    adapter, or (``allow_hub_loras``) a Hub id. Raises a 400 naming ``loras``."""
    if not req.loras:
        return ()
    if not model.info.takes_loras:
        raise InvalidRequestError(f"{model.name} takes no LoRA adapters", param="loras")
    if len(req.loras) > model.max_loras_per_request:
        raise InvalidRequestError(
            f"{len(req.loras)} adapters asked for; {model.name} applies at most "
            f"{model.max_loras_per_request} per request",
            param="loras",
        )
    configured = {adapter.name: adapter for adapter in model.requestable_loras}
    refs = []
    for name, weight in req.loras:
        adapter = configured.get(name)
        if adapter is not None:
            refs.append(LoraRef(name, adapter.source, adapter.weight_name,
                                adapter.default_weight if weight is None else weight))
        elif model.allow_hub_loras and _HUB_ID.match(name):
            refs.append(LoraRef(name, Source.hub(name), None, 1.0 if weight is None else weight))
        else:
            known = ", ".join(configured) or "none"
            hub = "; or any Hub LoRA by its id" if model.allow_hub_loras else ""
            raise InvalidRequestError(
                f"{name!r} is not a LoRA adapter of {model.name}; its adapters: {known}{hub}",
                param="loras",
            )
    return tuple(refs)


def _chain_hint(config: AppConfig, served: ModelConfig) -> str:
    chains = [c.name for c in config.chains if c.refiner == served.name]
    return f"; use {', '.join(chains)}" if chains else ""


def _edit_size(req, served: ModelConfig, image: np.ndarray) -> tuple[int, int]:
    """The output size of an edit: as asked, else the input's rounded down to 8."""
    limits = served.limits
    if req.size in (None, "auto"):
        width, height = image.shape[1] // 8 * 8, image.shape[0] // 8 * 8
        param = "image"
    else:
        width, height = parse_size(req.size)
        param = "size"
        if width % 8 or height % 8:
            raise InvalidRequestError(
                f"size {req.size!r}: width and height must be multiples of 8", param="size"
            )
    if min(width, height) < served.min_input_side:
        raise InvalidRequestError(
            f"{served.name} edits images of at least {served.min_input_side} pixels a side; "
            f"the output would be {width}x{height}",
            param=param,
        )
    if width * height > limits.output_pixels:
        raise InvalidRequestError(
            f"{width}x{height} is over {served.name}'s limit of {limits.output_pixels} output pixels",
            param=param,
        )
    return width, height


def plan_image_to_image(
    req: ImageRequest,
    image: np.ndarray,
    mask: np.ndarray | None,
    config: AppConfig,
    seed_source: SeedSource = draw_seed,
) -> GenerationPlan:
    """Plan an edit (prompt, optional mask) or a variation (no prompt, no mask).

    ``image`` (H, W, 3) and ``mask`` (H, W) are the decoded uploads, at their own size: the
    job says the output size, and execution resizes them to it.
    """
    check_request_limits(req, config)
    served = _resolve(config, req.model)
    what = "inpaint" if mask is not None else "image-to-image"
    _require(served, what, "inpaint (edits with a mask)" if mask is not None else "edit images")
    steps = _check_common(req, served, check_steps=False)
    if mask is not None and mask.shape != image.shape[:2]:
        raise InvalidRequestError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but image is "
            f"{image.shape[1]}x{image.shape[0]}; they must be the same size",
            param="mask",
        )
    width, height = _edit_size(req, served, image)
    default_strength = 1.0 if mask is not None else served.defaults.strength
    strength = req.strength if req.strength is not None else default_strength
    run = steps_run(steps, strength)
    if run < 1:
        raise InvalidRequestError(
            f"strength={strength} with num_inference_steps={steps} runs no denoising step; "
            "raise one of them",
            param="strength",
        )
    if run > served.limits.max_steps:
        raise InvalidRequestError(
            f"num_inference_steps={steps} with strength={strength} runs {run} denoising steps; "
            f"{served.name}'s limit is {served.limits.max_steps}",
            param="num_inference_steps",
        )
    prompt = req.prompt
    negative, guidance = _negative(req, served), _guidance(req, served)
    seeds = _seeds(req.seed, req.n, seed_source)
    stage = Stage(
        served.name,
        ImageToImageJob(prompt, negative, width, height, steps, guidance, strength, seeds,
                        loras=lora_refs(req, served)),
        (image,) if mask is None else (image, mask),
    )
    stages, out_w, out_h = _with_upscale(
        config, req.upscale, [stage], prompt, negative, seeds, width, height
    )
    plan = GenerationPlan(served.name, out_w, out_h, seeds, stages, req.output_format,
                          req.output_compression, req.response_format)
    # A variation has no prompt: what the checker judged came from the image.
    param = "prompt" if req.task == "edit" else "image"
    return _with_safety(_with_stream(_check_total_pixels(plan, config), req), req, config, param)


def plan_upscale(
    req: ImageRequest,
    image: np.ndarray,
    config: AppConfig,
    seed_source: SeedSource = draw_seed,
) -> GenerationPlan:
    """Plan ``POST /v1/images/upscale``: one upscaler on an uploaded image."""
    check_request_limits(req, config)
    served = _resolve(config, req.model, config.default_upscaler)
    upscaler = _require(served, "upscale", "upscale images")
    # ESRGAN is one forward pass: like Stability's API, it ignores the diffusion fields.
    diffusion = upscaler.info.diffusion
    steps = _check_common(req, upscaler, check_steps=diffusion)
    limits, factor = upscaler.limits, upscaler.upscale_factor
    in_h, in_w = image.shape[:2]
    if in_w * in_h > limits.max_input_pixels:
        raise InvalidRequestError(
            f"{upscaler.name} takes at most {limits.max_input_pixels} input pixels; the image is "
            f"{in_w}x{in_h} = {in_w * in_h}",
            param="image",
        )
    if min(in_w, in_h) < upscaler.min_input_side:
        raise InvalidRequestError(
            f"{upscaler.name} needs an image of at least {upscaler.min_input_side} pixels a side; "
            f"the image is {in_w}x{in_h}",
            param="image",
        )
    if req.width is not None and req.height is not None:
        raise InvalidRequestError(
            "give width or height, not both: the other follows the image's aspect ratio",
            param="height",
        )
    if req.width is not None:
        out_w, out_h, param = req.width, max(1, round(req.width * in_h / in_w)), "width"
    elif req.height is not None:
        out_w, out_h, param = max(1, round(req.height * in_w / in_h)), req.height, "height"
    else:
        out_w, out_h, param = in_w * factor, in_h * factor, "image"
    if out_w * out_h > upscaler.max_output_pixels:
        raise InvalidRequestError(
            f"{upscaler.name} makes at most {upscaler.max_output_pixels} output pixels; "
            f"{out_w}x{out_h} is {out_w * out_h}",
            param=param,
        )
    if req.noise_level is not None and not upscaler.info.takes_noise_level:
        raise InvalidRequestError(
            f"noise_level applies to the x4 upscaler only, not to {upscaler.name}",
            param="noise_level",
        )
    defaults = upscaler.defaults
    seeds = _seeds(req.seed, req.n, seed_source)
    job = UpscaleJob(
        req.prompt if diffusion else "",
        _negative(req, upscaler) if diffusion else None,
        steps,
        _guidance(req, upscaler),
        seeds,
        noise_level=req.noise_level if req.noise_level is not None else defaults.noise_level,
    )
    stage = Stage(upscaler.name, job, (image,))
    plan = GenerationPlan(upscaler.name, out_w, out_h, seeds, (stage,), req.output_format,
                          req.output_compression, req.response_format)
    return _with_safety(_check_total_pixels(plan, config), req, config, "image")
