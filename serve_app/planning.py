"""Request planning: which deployments run a request, in what order, with which jobs.

A plan is built and checked against the model's limits before any model work starts.
Running it hands each stage's ``DeploymentResponse`` straight into the next stage's
handle call, so intermediate results (latents) go from replica to replica and never
come back through the ingress.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable

from deployments.jobs import RefineJob, TextToImageJob
from serve_app.config import AppConfig, ModelConfig, RefinerChainConfig
from serve_app.errors import InvalidRequestError, ModelNotFoundError
from serve_app.protocol import MAX_SEED, ImageGenerationRequest, parse_size

# Seeds drawn for requests without one stay in 32 bits, like the seeds other services show.
_DRAWN_SEED_LIMIT = 2**32


def draw_seed() -> int:
    return secrets.randbelow(_DRAWN_SEED_LIMIT)


@dataclass(frozen=True)
class Stage:
    """One handle call: ``handles[deployment].<method>.remote(job, <previous result>)``."""

    deployment: str
    method: str
    job: TextToImageJob | RefineJob


@dataclass(frozen=True)
class GenerationPlan:
    model: str
    width: int
    height: int
    seeds: tuple[int, ...]
    stages: tuple[Stage, ...]
    output_format: str
    output_compression: int | None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def _resolve(config: AppConfig, name: str | None) -> ModelConfig | RefinerChainConfig:
    served = config.resolve(name)
    if served is None:
        raise ModelNotFoundError(name or "", config.served_names())
    return served


def _check_common(req: ImageGenerationRequest, served: ModelConfig | RefinerChainConfig):
    limits, defaults = served.limits, served.defaults
    if req.n > limits.max_n:
        raise InvalidRequestError(
            f"n={req.n} is above the limit of {limits.max_n} images per request for {served.name}",
            param="n",
        )
    size = defaults.size if req.size in (None, "auto") else req.size
    if size not in limits.sizes:
        raise InvalidRequestError(
            f"size {size!r} is not supported by {served.name}; "
            f"allowed sizes: {', '.join(limits.sizes)}",
            param="size",
        )
    steps = req.num_inference_steps or defaults.num_inference_steps
    if steps > limits.max_steps:
        raise InvalidRequestError(
            f"num_inference_steps={steps} is above the limit of {limits.max_steps} for {served.name}",
            param="num_inference_steps",
        )
    if req.output_compression is not None and req.output_format == "png":
        raise InvalidRequestError(
            "output_compression applies to the jpeg and webp output formats only",
            param="output_compression",
        )
    if req.seed is not None and req.seed + req.n - 1 > MAX_SEED:
        raise InvalidRequestError(f"seed + n - 1 must be at most {MAX_SEED}", param="seed")
    width, height = parse_size(size)
    return width, height, steps


def plan_generation(
    req: ImageGenerationRequest,
    config: AppConfig,
    seed_source: Callable[[], int] = draw_seed,
) -> GenerationPlan:
    """Check ``req`` against its model and build the stages that answer it.

    Raises :class:`ModelNotFoundError` (404) or :class:`InvalidRequestError` (400) before
    any model work.
    """
    served = _resolve(config, req.model)
    width, height, steps = _check_common(req, served)
    defaults = served.defaults
    guidance = req.guidance_scale if req.guidance_scale is not None else defaults.guidance_scale
    negative = req.negative_prompt if req.negative_prompt is not None else defaults.negative_prompt
    first_seed = req.seed if req.seed is not None else seed_source()
    seeds = tuple(first_seed + i for i in range(req.n))

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
        stages = (
            Stage(
                served.base,
                "text_to_image",
                TextToImageJob(req.prompt, negative, width, height, steps, guidance, seeds,
                               denoising_end=frac),
            ),
            Stage(
                served.refiner,
                "refine",
                RefineJob(req.prompt, negative, steps, guidance, seeds, denoising_start=frac),
            ),
        )
    else:
        if "text-to-image" not in served.capabilities:
            chains = [c.name for c in config.chains if c.refiner == served.name]
            hint = f"; use {', '.join(chains)}" if chains else ""
            raise InvalidRequestError(
                f"{served.name} does not generate images from text{hint}", param="model"
            )
        if req.high_noise_frac is not None:
            raise InvalidRequestError(
                f"high_noise_frac applies to refiner chains only, not to {served.name}",
                param="high_noise_frac",
            )
        stages = (
            Stage(
                served.name,
                "text_to_image",
                TextToImageJob(req.prompt, negative, width, height, steps, guidance, seeds),
            ),
        )
    return GenerationPlan(
        model=served.name,
        width=width,
        height=height,
        seeds=seeds,
        stages=stages,
        output_format=req.output_format,
        output_compression=req.output_compression,
    )


async def run_plan(plan: GenerationPlan, handles: dict[str, Any]):
    """Call each stage's deployment, chaining responses; return the last stage's result."""
    response = None
    for stage in plan.stages:
        method = getattr(handles[stage.deployment], stage.method)
        args = (stage.job,) if response is None else (stage.job, response)
        response = method.remote(*args)
    return await response
