"""Request planning: which deployments run a request, in what order, with which jobs.

Every front's request arrives as one :class:`~serve_app.protocol.request.ImageRequest`,
and :func:`plan_request` plans every operation (generate, edit, variation, upscale) in one
sequence: the ingress's limits, the model, the checks every model shares, the operation's
own checks and output size (serve_app/protocol/sizes.py), seeds, the operation's stages, an
optional upscale stage, the request's pixel budget, streaming and the safety check. Only
the steps that differ are the operation's (:class:`Operation`). A plan is checked against
the models' limits before any model work starts; serve_app/service/execution.py runs it.

One module, over 400 lines: the planning sequence and the operations' hooks read best on
one page, each operation beside the steps it overrides.
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
from serve_app.protocol.errors import InvalidRequestError, ModelNotFoundError
from serve_app.protocol import sizes
from serve_app.protocol.request import DRAWN_SEED_LIMIT, MAX_N, MAX_SEED, ImageRequest
from serve_app.service.uploads import UploadRule

# A Hub repository id: owner/name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def draw_seed() -> int:
    """The seed of a request without one: the one place a seed is drawn, for every front.
    Low enough that each of up to MAX_N images (seed + i) stays below DRAWN_SEED_LIMIT."""
    return secrets.randbelow(DRAWN_SEED_LIMIT - MAX_N + 1)


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
    # The operation (generate, edit, variation, upscale): a stream's events are named after it.
    task: str = "generate"

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


def _seeds(seed: int | None, n: int, seed_source: SeedSource,
           each: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Each image's seed: the request's seed rules, checked here once (the wire bounds each
    seed by its type), and a seed drawn where the request has none."""
    if each:  # one per image, as given
        if len(each) != n or seed is not None or not all(0 <= s <= MAX_SEED for s in each):
            raise InvalidRequestError(f"seeds: give {n} seeds from 0 to {MAX_SEED}, one per image, "
                                      "without seed", param="seed")
        return tuple(each)
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


def _with_safety(plan: GenerationPlan, req: ImageRequest, config: AppConfig, param: str,
                 low_allowed: bool = False) -> GenerationPlan:
    """Add the safety check the server's policy and the request's ``moderation`` ask for;
    ``low_allowed``: this caller's key may ask for 'low' (``safety.allow_low_keys``)."""
    safety, moderation = config.safety, req.moderation
    if safety is None:
        return plan
    if moderation == "low" and not (safety.allow_low or low_allowed):
        raise InvalidRequestError(
            "moderation 'low' is not allowed on this server"
            + (" for this API key" if safety.allow_low_keys else "") + "; use 'auto'",
            param="moderation")
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


def _check_common(req, served: ModelConfig | RefinerChainConfig, step_limit: tuple[int, str] | None) -> int:
    """Checks every route shares; returns the number of denoising steps. ``step_limit``:
    the most ``num_inference_steps`` the operation takes on this model, and what the limit
    is in words (None: the model ignores steps)."""
    limits, defaults = served.limits, served.defaults
    if req.n > limits.max_n:
        raise InvalidRequestError(
            f"{req.n} images per request is above {served.name}'s limit of {limits.max_n}",
            param="n",
        )
    steps = req.num_inference_steps or defaults.num_inference_steps
    if step_limit is not None and steps > step_limit[0]:
        raise InvalidRequestError(
            f"{steps} denoising steps is above {served.name}'s limit of {step_limit[0]}{step_limit[1]}",
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
    """Append an upscale stage when asked (extension ``upscale``). Latents are handed over
    where the upscaler takes latents of the same latent space (SD 2.1 -> x2 latent), so the
    previous stage skips its VAE decode; from any other space (SDXL -> x2) images go over."""
    if name is None:
        return tuple(stages), width, height
    upscaler = config.resolve(name)
    if upscaler is None or not isinstance(upscaler, ModelConfig) or "upscale" not in upscaler.capabilities:
        known = [m.name for m in config.models if "upscale" in m.capabilities]
        raise InvalidRequestError(
            f"upscale={name!r} is not an upscaler; available: {', '.join(known) or 'none'}",
            param="upscale",
        )
    sizes.upscale_input(upscaler, width, height, chained=True)
    if len(seeds) > upscaler.limits.max_n:
        raise InvalidRequestError(
            f"{upscaler.name} upscales at most {upscaler.limits.max_n} images per request",
            param="n",
        )
    defaults = upscaler.defaults
    stage = Stage(upscaler.name, UpscaleJob(prompt, negative_prompt, defaults.num_inference_steps,
                                            defaults.guidance_scale, seeds,
                                            noise_level=defaults.noise_level))
    last = stages[-1]
    if hands_latents(config.model(last.deployment).family, upscaler.family):
        stages[-1] = dataclasses.replace(last, job=dataclasses.replace(last.job, output_latents=True))
    factor = upscaler.upscale_factor
    return (*stages, stage), width * factor, height * factor


@dataclass(frozen=True)
class Inputs:
    """What one request brings: the request, its decoded uploads, and what planning has
    found so far (the served model, its steps and the output size)."""

    req: ImageRequest
    image: np.ndarray | None  # (H, W, 3) uint8, at its own size
    mask: np.ndarray | None  # (H, W) uint8
    served: Any = None  # ModelConfig | RefinerChainConfig
    steps: int = 0
    width: int = 0
    height: int = 0


class Operation:
    """The steps of :func:`plan_request` that differ between operations."""

    default_model: Callable[[AppConfig], str | None] = staticmethod(lambda config: None)

    def require(self, served, config: AppConfig, inputs: Inputs):
        """The served model, if it does this operation (else a 400 naming ``model``)."""
        raise NotImplementedError

    def step_limit(self, served) -> tuple[int, str] | None:
        """The most ``num_inference_steps`` this operation takes on ``served``, and a few
        words on it for the error; None where the model ignores steps (still bounded on the
        wire)."""
        return served.limits.max_steps, ""

    def output_size(self, config: AppConfig, inputs: Inputs) -> tuple[int, int]:
        """The operation's own checks; returns the output size (before any upscale)."""
        raise NotImplementedError

    def upload_check(self, served, req: ImageRequest, has_mask: bool
                     ) -> tuple[Callable[[int, int], None] | None, tuple[int, int] | None]:
        """The rule on an uploaded image's (width, height), read from its header before
        decoding (raises a 400), and the size the model takes it at when known then."""
        return None, None

    def stages(self, config: AppConfig, inputs: Inputs, seeds: tuple[int, ...]) -> list[Stage]:
        raise NotImplementedError

    def moderation_param(self, req: ImageRequest) -> str:
        """The field a flagged image is blamed on: what the checker judged came from it."""
        return "prompt"


class Generate(Operation):
    """Text to image, by one model or a refiner chain (base -> refiner)."""

    def require(self, served, config, inputs):
        if isinstance(served, ModelConfig):
            _require(served, "text-to-image", "generate images from text" + _chain_hint(config, served))
        return served

    def output_size(self, config, inputs):
        req, served = inputs.req, inputs.served
        width, height = sizes.generation_size(served, req.size)
        if isinstance(served, RefinerChainConfig):
            frac = self._frac(req, served)
            # Both experts must get at least one step, or one of them silently does nothing.
            if min(inputs.steps * frac, inputs.steps * (1 - frac)) < 1 - 1e-6:
                raise InvalidRequestError(
                    f"num_inference_steps={inputs.steps} with high_noise_frac={frac} leaves one "
                    "of base and refiner without a denoising step; raise num_inference_steps or "
                    "move high_noise_frac towards 0.5",
                    param="num_inference_steps",
                )
        elif req.high_noise_frac is not None:
            raise InvalidRequestError(
                f"high_noise_frac applies to refiner chains only, not to {served.name}",
                param="high_noise_frac",
            )
        return width, height

    @staticmethod
    def _frac(req, served) -> float:
        return req.high_noise_frac if req.high_noise_frac is not None else served.defaults.high_noise_frac

    def stages(self, config, inputs, seeds):
        req, served = inputs.req, inputs.served
        guidance, negative = _guidance(req, served), _negative(req, served)
        second = _second_prompts(req, config, served)
        # Adapters apply to the stage they were made for: the base of a refiner chain.
        loras = lora_refs(req, config.prompted_model(served))
        if isinstance(served, RefinerChainConfig):
            frac = self._frac(req, served)
            return [
                Stage(served.base, TextToImageJob(
                    req.prompt, negative, inputs.width, inputs.height, inputs.steps, guidance, seeds,
                    denoising_end=frac, output_latents=True, loras=loras, **second)),
                Stage(served.refiner, RefineJob(req.prompt, negative, inputs.steps, guidance, seeds,
                                                denoising_start=frac)),
            ]
        return [Stage(served.name, TextToImageJob(
            req.prompt, negative, inputs.width, inputs.height, inputs.steps, guidance, seeds,
            loras=loras, **second))]


class ImageToImage(Operation):
    """An edit (prompt, optional mask: inpainting) or a variation (no prompt, no mask)."""

    def require(self, served, config, inputs):
        if inputs.mask is not None:
            return _require(served, "inpaint", "inpaint (edits with a mask)")
        return _require(served, "image-to-image", "edit images")

    def step_limit(self, served):
        # The scheduler sets up the whole schedule however few of its steps run (strength):
        # it is bounded itself, and the steps run (num_inference_steps x strength) below.
        return served.max_schedule_steps, (
            " for an image-to-image schedule (num_inference_steps x strength of its steps run, "
            f"at most {served.limits.max_steps})")

    def output_size(self, config, inputs):
        req, served, image, mask = inputs.req, inputs.served, inputs.image, inputs.mask
        if mask is not None and mask.shape != image.shape[:2]:
            raise InvalidRequestError(
                f"mask is {mask.shape[1]}x{mask.shape[0]} but image is "
                f"{image.shape[1]}x{image.shape[0]}; they must be the same size",
                param="mask",
            )
        width, height = sizes.edit_size(served, req.size, image.shape[1], image.shape[0])
        strength, steps = self._strength(inputs), inputs.steps
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
        return width, height

    def upload_check(self, served, req, has_mask):
        if req.size in (None, "auto"):  # the output is the input's size: the model's limits
            return (lambda width, height: sizes.edit_size(served, None, width, height)), None
        try:
            target = sizes.parse_size(req.size)
        except ValueError:
            return None, None  # planning refuses the size itself
        limit = served.limits.max_input_pixels
        check = None
        if limit is not None:
            def check(width: int, height: int) -> None:
                if width * height > limit:
                    raise InvalidRequestError(
                        f"{served.name} takes images of at most {limit} pixels to edit; the image "
                        f"is {width}x{height} = {width * height}", param="image")
        # With a mask the image is read whole: the mask must match its size, pixel for pixel.
        return check, None if has_mask else target

    @staticmethod
    def _strength(inputs: Inputs) -> float:
        default = 1.0 if inputs.mask is not None else inputs.served.defaults.strength
        return inputs.req.strength if inputs.req.strength is not None else default

    def stages(self, config, inputs, seeds):
        req, served, image, mask = inputs.req, inputs.served, inputs.image, inputs.mask
        job = ImageToImageJob(req.prompt, _negative(req, served), inputs.width, inputs.height,
                              inputs.steps, _guidance(req, served), self._strength(inputs), seeds,
                              loras=lora_refs(req, served))
        return [Stage(served.name, job, (image,) if mask is None else (image, mask))]

    def moderation_param(self, req):
        # A variation has no prompt: what the checker judged came from the image.
        return "prompt" if req.task == "edit" else "image"


class Upscale(Operation):
    """``POST /v1/images/upscale``: one upscaler on an uploaded image."""

    default_model = staticmethod(lambda config: config.default_upscaler)

    def require(self, served, config, inputs):
        return _require(served, "upscale", "upscale images")

    def step_limit(self, served):
        # ESRGAN is one forward pass: like Stability's API, it ignores the diffusion fields.
        return super().step_limit(served) if served.info.diffusion else None

    def upload_check(self, served, req, has_mask):
        return (lambda width, height: sizes.upscale_input(served, width, height)), None

    def output_size(self, config, inputs):
        req, upscaler = inputs.req, inputs.served
        in_h, in_w = inputs.image.shape[:2]
        sizes.upscale_input(upscaler, in_w, in_h)
        out = sizes.upscale_size(upscaler, in_w, in_h, req.width, req.height)
        if req.noise_level is not None and not upscaler.info.takes_noise_level:
            raise InvalidRequestError(
                f"noise_level applies to the x4 upscaler only, not to {upscaler.name}",
                param="noise_level",
            )
        return out

    def stages(self, config, inputs, seeds):
        req, upscaler = inputs.req, inputs.served
        diffusion = upscaler.info.diffusion
        job = UpscaleJob(
            req.prompt if diffusion else "",
            _negative(req, upscaler) if diffusion else None,
            inputs.steps,
            _guidance(req, upscaler),
            seeds,
            noise_level=req.noise_level if req.noise_level is not None else upscaler.defaults.noise_level,
        )
        return [Stage(upscaler.name, job, (inputs.image,))]

    def moderation_param(self, req):
        return "image"


OPERATIONS: dict[str, Operation] = {
    "generate": Generate(),
    "edit": ImageToImage(),
    "variation": ImageToImage(),
    "upscale": Upscale(),
}


# Stands in for a mask not decoded yet: an operation's ``require`` asks only whether there is one.
_MASK_SENT = object()


def upload_rule(req: ImageRequest, config: AppConfig, has_mask: bool = False) -> UploadRule:
    """What ``req``'s uploaded image may be, before it is decoded: the request's cheap checks
    (prompt lengths, model, operation, n, steps) first, then the model's and operation's rule
    on the image's size (an upscaler's input limit, an edit's output limits) and the size
    the model takes it at. Raises what :func:`plan_request` would raise for those."""
    operation = OPERATIONS[req.task]
    check_request_limits(req, config)
    inputs = Inputs(req, None, _MASK_SENT if has_mask else None)
    served = operation.require(_resolve(config, req.model, operation.default_model(config)),
                               config, inputs)
    _check_common(req, served, operation.step_limit(served))
    check, target = operation.upload_check(served, req, has_mask)
    return UploadRule(config.ingress.max_upload_pixels, check, target)


def plan_request(
    req: ImageRequest,
    config: AppConfig,
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    seed_source: SeedSource = draw_seed,
    low_moderation_owners: frozenset[str] = frozenset(),
) -> GenerationPlan:
    """Check ``req`` against its model and build the stages that answer it, whatever the
    operation (``req.task``). ``image`` (H, W, 3) and ``mask`` (H, W) are the decoded
    uploads at their own size: the job says the output size, and execution resizes them.

    Raises :class:`ModelNotFoundError` (404) or :class:`InvalidRequestError` (400) before
    any model work. ``low_moderation_owners``: the callers (``req.owner``) that may ask for
    moderation 'low' beside everyone ``safety.allow_low`` lets.
    """
    operation = OPERATIONS[req.task]
    inputs = Inputs(req, image, mask)
    check_request_limits(req, config)
    served = operation.require(_resolve(config, req.model, operation.default_model(config)),
                               config, inputs)
    steps = _check_common(req, served, operation.step_limit(served))
    inputs = dataclasses.replace(inputs, served=served, steps=steps)
    width, height = operation.output_size(config, inputs)
    inputs = dataclasses.replace(inputs, width=width, height=height)
    seeds = _seeds(req.seed, req.n, seed_source, req.seeds)
    stages = operation.stages(config, inputs, seeds)
    all_stages, out_w, out_h = _with_upscale(config, req.upscale, stages, req.prompt,
                                             _negative(req, served), seeds, width, height)
    plan = GenerationPlan(served.name, out_w, out_h, seeds, all_stages, req.output_format,
                          req.output_compression, req.response_format, task=req.task)
    plan = _with_stream(_check_total_pixels(plan, config), req)
    return _with_safety(plan, req, config, operation.moderation_param(req),
                        low_allowed=bool(req.owner) and req.owner in low_moderation_owners)


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
