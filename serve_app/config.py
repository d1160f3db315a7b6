"""The application config: the ``args`` of a Serve config file, validated with pydantic.

One source of truth for served model names, aliases, defaults, limits and the Ray options
of every deployment. Unknown keys anywhere are rejected so that a typo in a config file
fails at deploy time with the offending path in the message.
"""

from __future__ import annotations

import os

import dataclasses

from typing import Annotated, Any, Literal, Optional

from pydantic import (
    BaseModel,
    BeforeValidator,
    PlainSerializer,
    WithJsonSchema,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema

from deployments.families import FAMILIES, SAFETY_CHECKER, SERVED_FAMILIES, component_for, family_of_source
from deployments.contract import MAX_HUB_LORA_BYTES, LoraRef, PipelineSpec, images_in_flight
from deployments.sources import Source
from serve_app.protocol import sizes as size_rules
from serve_app.protocol.request import LORA_WEIGHT_MAX, LORA_WEIGHT_MIN, MAX_LORAS, MAX_N, MAX_PROMPT_CHARS, MAX_STEPS
from serve_app.protocol.sizes import parse_size

Family = Literal[SERVED_FAMILIES]  # type: ignore[valid-type]

# A weights source, parsed once here (deployments/sources.py) and written back as its text.
SourceField = Annotated[
    Source,
    BeforeValidator(Source.parse),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "Hub id, local folder, hf://ID[@REV]/PATH, "
                    "or KIND:NAME of an installed source kind (tiny:, sim:)."}),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _DeploymentOptions(_Strict):
    """Ray Serve options of one deployment (passed to ``serve.deployment(...).options``).

    Declared here: the options whose shape or defaults are ours (the actor's resources
    flattened out of ``ray_actor_options``; request limits sized for a model replica; one
    way to scale). Every other option of Serve's deployment schema is added below from
    ``ray.serve.schema.DeploymentSchema`` itself, and the whole set is checked by that schema.
    """

    num_gpus: float = Field(default=0, ge=0, description="GPUs per replica; fractions share one GPU.")
    num_cpus: float = Field(default=1, ge=0, description="CPUs reserved per replica.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources per replica, to pin replicas to the nodes that "
        "declare them (configs/cluster.yaml: the ingress takes 'cpu_node', which only the CPU "
        "workers declare, so it never takes a GPU worker's CPUs).",
    )
    num_replicas: int | None = Field(
        default=None, ge=0, description="Fixed replica count; leave unset when autoscaling."
    )
    autoscaling_config: dict[str, Any] | None = Field(
        default=None,
        description="Ray Serve autoscaling_config (min_replicas, max_replicas, "
        "target_ongoing_requests, ...).",
    )
    max_ongoing_requests: int = Field(
        default=4, ge=1, description="Requests a replica works on at once (room for a batch)."
    )
    max_queued_requests: int = Field(
        default=-1,
        ge=-1,
        description="Requests waiting for a replica before callers get 503; -1 is unbounded.",
    )

    @field_validator("autoscaling_config")
    @classmethod
    def _check_autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown autoscaling_config keys: {', '.join(unknown)}")
        AutoscalingConfig(**value)  # Ray's own checks (min <= max, ...)
        return value

    @model_validator(mode="after")
    def _serve_checks(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        DeploymentSchema(name="check", **self.serve_options())  # Serve's own checks
        return self

    @property
    def scales_to_zero(self) -> bool:
        """Autoscaling down to no replica (``min_replicas: 0``): the first request starts one."""
        return self.autoscaling_config is not None and AutoscalingConfig(
            **self.autoscaling_config).min_replicas == 0

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``: the options as written, the actor's
        resources gathered into ``ray_actor_options``, one replica unless told otherwise."""
        actor = {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus,
                 **({"resources": dict(self.resources)} if self.resources else {})}
        options = self.model_dump(exclude_none=True,
                                  exclude={"num_gpus", "num_cpus", "resources", "num_replicas"})
        if self.autoscaling_config is None:
            options["num_replicas"] = self.num_replicas if self.num_replicas is not None else 1
        return {"ray_actor_options": actor, **options}


# Serve's options this app sets itself (name, the actor options, the app's own args) or
# declares above; every other option of Serve's deployment schema passes through as written.
_SET_BY_THE_APP = {"name", "ray_actor_options", "user_config", *_DeploymentOptions.model_fields}
DeploymentOptions = create_model(
    "DeploymentOptions",
    __base__=_DeploymentOptions,
    __doc__=_DeploymentOptions.__doc__,
    **{
        name: (Optional[Annotated[(field.annotation, *field.metadata)] if field.metadata
                        else field.annotation],
               Field(default=None, description=f"Serve's own option: {field.description}"))
        for name, field in DeploymentSchema.model_fields.items() if name not in _SET_BY_THE_APP
    },
)


class BatchingConfig(_Strict):
    """How a replica gathers concurrent compatible jobs into one pipeline call."""

    max_batch_images: int = Field(
        default=8, ge=1, description="Most images in one pipeline call (1 turns batching off)."
    )
    batch_wait_timeout_s: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="How long a batch that is not full waits for more jobs before it starts, "
        "while jobs arrive closer together than this (a burst); a lone job starts at once. "
        "0 never waits (jobs that arrive while a batch runs join the next one). Request mode only.",
    )
    mode: Literal["request", "step"] = Field(
        default="request",
        description="'request': a batch of jobs with the same size, steps, guidance, strength "
        "and adapters runs one pipeline call to its end. 'step' (SD 2.1, SDXL and its refiner): "
        "jobs join and leave a running batch at every denoising step, and jobs of one latent "
        "shape and adapter set share each UNet call whatever their steps, guidance, strength "
        "or denoising start and end (deployments/runtime/steploop.py).",
    )
    max_shape_wait_s: float = Field(
        default=2.0,
        ge=0,
        description="Step mode: once a job of another shape (or adapter set) has waited this "
        "long, no more jobs join the running batch, and that job's shape goes next.",
    )
    max_images_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Step mode: most images a replica keeps in flight (started, not yet done); "
        "each UNet call takes at most max_batch_images of them (new jobs' first step alone, "
        "else the oldest first). Default: 16 x max_batch_images. deployment.max_ongoing_requests (the jobs "
        "Serve sends a replica) defaults to it in step mode.",
    )

    @model_validator(mode="after")
    def _in_flight(self) -> BatchingConfig:
        if self.max_images_in_flight is not None:
            if self.mode != "step":
                raise ValueError("max_images_in_flight: step mode only (batching.mode: step)")
            if self.max_images_in_flight < self.max_batch_images:
                raise ValueError(f"max_images_in_flight ({self.max_images_in_flight}) must be at "
                                 f"least max_batch_images ({self.max_batch_images})")
        return self


class GenerationDefaults(_Strict):
    """Values used when a request leaves a field out."""

    num_inference_steps: int = Field(ge=1, description="Denoising steps.")
    guidance_scale: float = Field(ge=0, description="Classifier-free guidance scale.")
    size: str | None = Field(
        default=None, description="'WIDTHxHEIGHT' of text-to-image output when the request has none."
    )
    negative_prompt: str | None = Field(default=None, description="Negative prompt by default.")
    high_noise_frac: float | None = Field(
        default=None, gt=0, lt=1, description="Refiner chains: share of steps run by the base."
    )
    strength: float = Field(
        default=0.75, gt=0, le=1,
        description="Image-to-image edits and variations: how far to move from the input "
        "(inpainting defaults to 1.0).",
    )
    noise_level: int | None = Field(
        default=None, ge=0, le=350, description="x4 upscaler: noise added to the input (20)."
    )

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value


class GenerationLimits(_Strict):
    """What a request may ask of a model."""

    max_n: int = Field(default=MAX_N, ge=1, le=MAX_N, description="Most images per request.")
    max_steps: int = Field(
        ge=1,
        le=MAX_STEPS,
        description="Most denoising steps a request runs (image-to-image runs "
        "num_inference_steps x strength of them), and the most num_inference_steps of a "
        "text-to-image or upscale request.",
    )
    max_schedule_steps: int | None = Field(
        default=None,
        ge=1,
        le=MAX_STEPS,
        description="Image-to-image (edits, variations, inpainting): the most "
        "num_inference_steps, whatever the strength (the schedule's length: the scheduler "
        "sets up every one of its timesteps, however few of them run). Default: 4 x max_steps, "
        "at most the timesteps the model's scheduler was trained on (1000).",
    )
    sizes: list[str] = Field(
        default_factory=list,
        description="Text-to-image sizes allowed by name ('WIDTHxHEIGHT', multiples of 8), "
        "besides any within min_side and max_pixels.",
    )
    min_side: int = Field(
        default=64,
        ge=8,
        description="Text-to-image sizes within max_pixels: smallest width or height.",
    )
    min_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Text-to-image sizes within the bounds: fewest pixels (SDXL does well "
        "around one megapixel, not far below).",
    )
    max_pixels: int | None = Field(
        default=None,
        ge=64,
        description="Text-to-image: any WIDTHxHEIGHT in multiples of 8 with both sides at "
        "least min_side and at most this many pixels is allowed, besides `sizes`. Edits: "
        "most output pixels (default: the largest of `sizes`).",
    )
    max_input_pixels: int | None = Field(
        default=None, ge=1,
        description="Upscalers: most pixels (width x height) of an input image. Edits and "
        "variations with a size: most pixels of the uploaded image, which is resized to that "
        "size (default: ingress.max_upload_pixels; without a size the output is the input's "
        "size, held to the output limits).",
    )
    max_output_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Upscalers: most output pixels when width or height is asked for "
        "(default: max_input_pixels x factor^2).",
    )
    min_input_side: int | None = Field(
        default=None,
        ge=1,
        description="Edits and upscalers: smallest input width or height (default: the "
        "smallest the model takes, from the family registry).",
    )

    # The rules themselves are serve_app/protocol/sizes.py's, shared with planning.
    @property
    def output_pixels(self) -> int:
        """Largest allowed output area: max_pixels, or the largest of the named sizes."""
        return size_rules.output_pixels(self)

    def allows(self, width: int, height: int) -> bool:
        """Whether text-to-image may make ``width`` x ``height``."""
        return size_rules.allows(self, width, height)

    def describe_sizes(self) -> str:
        """The allowed sizes, in words, for error messages."""
        return size_rules.describe_sizes(self)

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            width, height = parse_size(size)
            if width % 8 or height % 8:
                raise ValueError(f"size {size!r}: width and height must be multiples of 8")
        return value

    @model_validator(mode="after")
    def _check_bounds(self):
        if self.max_pixels is not None and self.min_side * self.min_side > self.max_pixels:
            raise ValueError(
                f"min_side {self.min_side} squared is over max_pixels {self.max_pixels}: "
                "no size would be allowed"
            )
        if self.min_pixels is not None and (
            self.max_pixels is None or self.min_pixels > self.max_pixels
        ):
            raise ValueError("min_pixels needs max_pixels, and must be at most max_pixels")
        if self.max_schedule_steps is not None and self.max_schedule_steps < self.max_steps:
            raise ValueError(f"max_schedule_steps ({self.max_schedule_steps}) must be at least "
                             f"max_steps ({self.max_steps})")
        return self


class LoraAdapterConfig(_Strict):
    """A LoRA adapter a model's requests may name."""

    name: str = Field(min_length=1, description="The name requests use (`loras`).")
    source: SourceField = Field(
        description="Hub id, local folder, or 'tiny:lora/<family>/<name>' for a tiny seeded one.",
    )
    weight_name: str | None = Field(
        default=None, description="The weights file in source (default: diffusers' own name)."
    )
    default_weight: float = Field(
        default=1.0, ge=LORA_WEIGHT_MIN, le=LORA_WEIGHT_MAX,
        description="Weight when a request names the adapter without one.",
    )


class FusedLoraConfig(_Strict):
    """An adapter of ``loras`` merged into the model's weights at load."""

    name: str = Field(min_length=1, description="An adapter of the model's `loras`.")
    weight: float | None = Field(
        default=None, ge=LORA_WEIGHT_MIN, le=LORA_WEIGHT_MAX,
        description="Its weight in the merge (default: its default_weight).",
    )


class _Served(_Strict):
    name: str = Field(min_length=1, description="Served model name (the `model` field).")
    aliases: list[str] = Field(default_factory=list, description="Other accepted names (Hub ids).")
    owned_by: str = Field(default="stabilityai", description="`owned_by` in /v1/models.")
    defaults: GenerationDefaults
    limits: GenerationLimits

    @model_validator(mode="after")
    def _defaults_within_limits(self):
        if self.defaults.size is not None and not self.limits.allows(*parse_size(self.defaults.size)):
            raise ValueError(
                f"defaults.size {self.defaults.size!r} is not an allowed size "
                f"({self.limits.describe_sizes()})"
            )
        if self.defaults.num_inference_steps > self.limits.max_steps:
            raise ValueError("defaults.num_inference_steps is above limits.max_steps")
        return self


class _WeightsReplica(_Strict):
    """What every deployment that loads weights shares: where they come from, how the
    replica runs them, and its batching and Ray options."""

    revision: str | None = Field(default=None, description="Hub revision of the weights.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        default="float16", description="dtype on CUDA."
    )
    cpu_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="dtype of a replica without a GPU: float32, or bfloat16 (half the memory; "
        "runs the half-precision code paths on CPU).",
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU replicas: torch threads (default: all cores; Ray alone would give "
        "one thread per reserved CPU, a single thread for a fraction).",
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    def _spec(self, **values: Any) -> PipelineSpec:
        """The pipeline spec: every spec field this config (or its ``batching``) has under
        the same name, then ``values``."""
        names = {f.name for f in dataclasses.fields(PipelineSpec)} - set(values)
        own = {key: getattr(self, key) for key in type(self).model_fields if key in names}
        batching = {key: getattr(self.batching, key) for key in BatchingConfig.model_fields
                    if key in names}
        if "batching_mode" in names:
            batching["batching_mode"] = self.batching.mode
        return PipelineSpec(**own, **batching, **values)

    @model_validator(mode="after")
    def _batch_fits(self):
        # Step mode: Serve sends a replica as many jobs as it keeps in flight, unless told
        # otherwise (with the default 4, a fifth job would wait in Serve's queue for one to
        # end instead of starting at the next step).
        if self.batching.mode == "step" and "max_ongoing_requests" not in self.deployment.model_fields_set:
            in_flight = images_in_flight(self.batching.max_batch_images, self.batching.max_images_in_flight)
            # A copy: a DeploymentOptions handed in may be shared with other models.
            self.deployment = self.deployment.model_copy(update={"max_ongoing_requests": in_flight})
        # A full batch of one-image requests must fit in what Serve lets a replica take on.
        if self.deployment.max_ongoing_requests < self.batching.max_batch_images:
            raise ValueError(
                f"deployment.max_ongoing_requests ({self.deployment.max_ongoing_requests}) must "
                f"be at least batching.max_batch_images ({self.batching.max_batch_images})"
            )
        return self


class ModelConfig(_Served, _WeightsReplica):
    """A pipeline served by its own deployment."""

    family: Family = Field(
        description="Model family (deployments/families.py): " + ", ".join(SERVED_FAMILIES) + "."
    )
    source: SourceField = Field(
        description="Hub id, local folder, 'tiny:<family>' for tiny random weights, or "
        "'sim:<family>' for a simulated accelerator (benchmarks only: it sleeps for an "
        "H100's time and returns made-up images; deployments/standins/sim.py).",
    )
    variant: str | None = Field(default=None, description="Weights variant, e.g. 'fp16'.")
    cpu_offload: bool = Field(
        default=False, description="CUDA only: diffusers model CPU offload to save GPU memory."
    )
    compile: bool = Field(
        default=False,
        description="CUDA only: torch.compile the UNet (dynamic shapes, no CUDA graphs), "
        "warmed up at start.",
    )
    preview_decoder: SourceField | None = Field(
        default=None,
        description="Tiny autoencoder for streamed previews, of the model's latent space "
        "(madebyollin/taesd for SD 2.1, madebyollin/taesdxl for SDXL, a local folder, or "
        "'tiny:taesd' / 'tiny:taesdxl'); default: a linear latent-to-RGB projection.",
    )
    vae: SourceField | None = Field(
        default=None,
        description="A replacement VAE of the same latent space, e.g. "
        "madebyollin/sdxl-vae-fp16-fix for SDXL: decodes in float16 instead of upcasting "
        "to float32 (or 'tiny:sdxl-vae-fp16-fix', or a local folder).",
    )
    vae_tiling: bool = Field(
        default=False,
        description="Decode (and encode) large images tile by tile: bounded VAE memory at any "
        "size, at a little speed.",
    )
    vae_slicing: bool = Field(
        default=False, description="Decode a batch one image at a time: VAE memory of one image."
    )
    loras: list[LoraAdapterConfig] = Field(
        default_factory=list, description="LoRA adapters requests may name (SD 2.1 and SDXL)."
    )
    max_loras_per_request: int = Field(default=3, ge=1, le=MAX_LORAS, description="Most adapters in one request.")
    max_loaded_loras: int = Field(
        default=8, ge=1,
        description="Adapters a replica keeps loaded; the least recently used is unloaded first.",
    )
    fused_loras: list[FusedLoraConfig] = Field(
        default_factory=list,
        description="Adapters of `loras` merged into the weights at load: every request runs "
        "with them at no per-step cost, and requests cannot name them.",
    )
    allow_hub_loras: bool = Field(
        default=False,
        description="Let requests name any Hub LoRA by its id (as Livepeer's runner does): "
        "the replica downloads and loads files from outside, so it is off unless an operator "
        "turns it on.",
    )
    max_hub_lora_bytes: int = Field(
        default=MAX_HUB_LORA_BYTES, gt=0,
        description="The largest Hub LoRA file a request may name, in bytes, checked through the "
        "Hub's metadata before anything is downloaded (a larger one is a 400 naming `loras`). "
        "Default 1 GiB: SD 2.1 and SDXL LoRAs are mostly 10-250 MB, the largest near 900 MB.",
    )

    @model_validator(mode="after")
    def _family_requirements(self) -> ModelConfig:
        if self.source.stand_in and self.source.family != self.family:
            raise ValueError(
                f"source {str(self.source)!r} does not match family {self.family!r} "
                f"(use '{self.source.kind}:{self.family}')"
            )
        caps = self.capabilities
        if self.preview_decoder is not None:
            if "text-to-image" not in caps:
                raise ValueError(f"preview_decoder: family {self.family} does not stream previews")
            self._check_component("preview_decoder", self.preview_decoder, "preview-decoder")
        if self.vae is not None:
            if self.info.layout != "pipeline" or self.info.latent_space is None:
                raise ValueError(f"vae: family {self.family} has no VAE to replace")
            self._check_component("vae", self.vae, "vae")
        if (self.vae_tiling or self.vae_slicing) and self.info.layout != "pipeline":
            raise ValueError(f"vae_tiling / vae_slicing: family {self.family} has no VAE")
        if "text-to-image" in caps and (
            self.defaults.size is None or not (self.limits.sizes or self.limits.max_pixels)
        ):
            raise ValueError(
                f"family {self.family} needs defaults.size, and limits.sizes or limits.max_pixels"
            )
        if "upscale" in caps and self.limits.max_input_pixels is None:
            raise ValueError(f"family {self.family} needs limits.max_input_pixels")
        trained = self.info.train_timesteps
        for key, steps in (("max_steps", self.limits.max_steps),
                           ("max_schedule_steps", self.limits.max_schedule_steps)):
            if trained is not None and steps is not None and steps > trained:
                raise ValueError(f"limits.{key} ({steps}) is above the {trained} timesteps "
                                 f"{self.family}'s scheduler was trained on: it would refuse "
                                 "or repeat them")
        if self.batching.mode == "step":
            if not self.info.step_batching:
                raise ValueError(f"batching.mode: family {self.family} batches by request only "
                                 "(step mode: sd21, sdxl, sdxl-refiner)")
            if self.cpu_offload:
                raise ValueError("batching.mode: step cannot run with cpu_offload (the modules "
                                 "would move on and off the GPU at every step)")
        self._check_loras()
        return self

    def _check_loras(self) -> None:
        if (self.loras or self.allow_hub_loras) and not self.info.takes_loras:
            raise ValueError(f"loras: family {self.family} takes no LoRA adapters")
        names = [adapter.name for adapter in self.loras]
        if len(set(names)) != len(names):
            raise ValueError("loras: two adapters have the same name")
        if self.max_loras_per_request > self.max_loaded_loras:
            raise ValueError(
                f"max_loras_per_request ({self.max_loras_per_request}) must be at most "
                f"max_loaded_loras ({self.max_loaded_loras}): a replica runs a request's "
                "adapters loaded together"
            )
        fused = [entry.name for entry in self.fused_loras]
        if len(set(fused)) != len(fused) or set(fused) - set(names):
            raise ValueError(f"fused_loras: each must name a different adapter of loras ({names})")
        for adapter in self.loras:
            source = adapter.source
            if source.stand_in:
                if source.lora is None:
                    raise ValueError(f"loras: {str(source)!r}: expected "
                                     f"'{source.kind}:lora/<family>/<name>'")
                if source.lora[0] != self.family:
                    raise ValueError(
                        f"loras: {str(source)!r} is a LoRA of {source.lora[0]}, not of {self.family}"
                    )

    def _check_component(self, key: str, source: Source, capability: str) -> None:
        """A known component (a stand-in or a registered Hub id) must do ``capability`` in
        this model's latent space; a local folder or another Hub id is taken on trust."""
        known = family_of_source(source)
        if known is None:
            if source.stand_in:
                raise ValueError(f"{key}: unknown {source.kind} source {str(source)!r}")
            return
        if capability not in known.capabilities or known.latent_space != self.info.latent_space:
            fitting = component_for(capability, self.info.latent_space)
            if fitting is None:
                hint = "none"
            elif source.stand_in:
                hint = f"{source.kind}:{fitting.name}"
            else:  # a Hub id: the real one, and the tiny profile's
                hint = f"{fitting.hub_source} (tiny profile: tiny:{fitting.name})"
            raise ValueError(
                f"{key}: {str(source)!r} is not a {capability} of {self.family}'s latent space "
                f"({self.info.latent_space}); use {hint}"
            )

    @property
    def info(self):
        """This model's entry in the family registry."""
        return FAMILIES[self.family]

    @property
    def capabilities(self) -> frozenset[str]:
        return self.info.capabilities

    @property
    def upscale_factor(self) -> int | None:
        return self.info.upscale_factor

    @property
    def max_schedule_steps(self) -> int:
        """Image-to-image: the most num_inference_steps, whatever the strength (config, else
        4 x max_steps within the scheduler's training timesteps)."""
        if self.limits.max_schedule_steps is not None:
            return self.limits.max_schedule_steps
        return min(4 * self.limits.max_steps, self.info.train_timesteps or MAX_STEPS)

    @property
    def min_input_side(self) -> int:
        """Edits and upscalers: the smallest input side taken (config, else the family's)."""
        if self.limits.min_input_side is not None:
            return self.limits.min_input_side
        return self.info.min_input_side or 64

    @property
    def max_output_pixels(self) -> int:
        """Upscalers: most output pixels of a request that asks for width or height."""
        if self.limits.max_output_pixels is not None:
            return self.limits.max_output_pixels
        return (self.limits.max_input_pixels or 0) * (self.upscale_factor or 1) ** 2

    def pipeline_spec(self) -> PipelineSpec:
        """What this model's replicas load: its spec fields, the adapters as LoraRefs."""
        return self._spec(
            fused_loras=self.fused_lora_refs(),
            loras=tuple(LoraRef(a.name, a.source, a.weight_name, a.default_weight)
                        for a in self.requestable_loras),
            hub_loras=self.allow_hub_loras,
        )

    @property
    def requestable_loras(self) -> list[LoraAdapterConfig]:
        """The adapters a request may name: those not fused into the weights."""
        fused = {entry.name for entry in self.fused_loras}
        return [adapter for adapter in self.loras if adapter.name not in fused]

    def fused_lora_refs(self) -> tuple[LoraRef, ...]:
        adapters = {adapter.name: adapter for adapter in self.loras}
        return tuple(
            LoraRef(e.name, adapters[e.name].source, adapters[e.name].weight_name,
                    adapters[e.name].default_weight if e.weight is None else e.weight)
            for e in self.fused_loras
        )


class RefinerChainConfig(_Served):
    """A served name that runs an SDXL base model, then an SDXL refiner on its latents."""

    base: str = Field(description="Name of the sdxl model that denoises first.")
    refiner: str = Field(description="Name of the sdxl-refiner model that finishes.")

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({"text-to-image"})  # a chain only generates from text

    @model_validator(mode="after")
    def _has_frac(self) -> RefinerChainConfig:
        if self.defaults.high_noise_frac is None:
            self.defaults.high_noise_frac = 0.8
        return self


class IngressConfig(_Strict):
    """The HTTP ingress deployment."""

    @model_validator(mode="before")
    @classmethod
    def _no_keys_here(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_keys" in data:
            raise ValueError(
                "api_keys: API keys are not read from the config (Serve shows a config to anyone "
                "who can read `serve config` or the dashboard); set them in the environment "
                "variable SERVE_APP_API_KEYS (comma-separated) or in a file named by "
                "SERVE_APP_API_KEYS_FILE (docs/operations.md#api-keys)")
        return data

    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.5, max_ongoing_requests=64)
    )
    png_encoder: Literal["fpng", "zlib"] = Field(
        default="fpng",
        description="PNG encoder: 'fpng' (a 1024x1024 photo in about 3 ms on one core, files "
        "about 10% larger than zlib at level 6) or 'zlib' (Pillow at png_compress_level: "
        "about 90 ms at level 1, 230 ms at 6, for the smallest files).",
    )
    png_compress_level: int = Field(
        default=6, ge=0, le=9, description="zlib level of PNG output with png_encoder 'zlib'."
    )
    request_timeout_s: float = Field(
        default=300, gt=0, description="A request still unanswered after this gets 504 and is cancelled."
    )
    retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After header of a 503 when a model's queue is full."
    )
    allow_anonymous: bool = Field(
        default=False,
        description="Serve without API keys although the proxies listen beyond this machine's "
        "loopback (http_options.host other than 127.0.0.1, or a gRPC port: Serve's gRPC proxy "
        "listens on every interface). Without it, such an ingress refuses to start with no key "
        "in SERVE_APP_API_KEYS or SERVE_APP_API_KEYS_FILE; with it, it starts and logs a warning.",
    )
    max_upload_bytes: int = Field(
        default=20_000_000, ge=1, description="Largest request body; 413 past it, checked as it streams."
    )
    max_prompt_chars: int = Field(
        default=2000, ge=1, le=MAX_PROMPT_CHARS,
        description="Longest prompt or negative_prompt, in characters.",
    )
    max_request_pixels: int = Field(
        default=33_554_432,
        ge=1,
        description="Most output pixels per request: n x width x height (after upscaling).",
    )
    max_upload_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="Uploads with more pixels are refused before decoding (decompression "
        "bombs); each model's own limits on its inputs are checked before decoding too.",
    )
    max_concurrent_decodes: int = Field(
        default=4,
        ge=1,
        description="Uploads an ingress replica decodes at once; more wait their turn. Each "
        "decode holds up to about 10 bytes a pixel of its image (docs/api.md#uploads).",
    )


class StoreQuota(_Strict):
    """How much one API key's share of a pool of the image store may hold."""

    max_bytes: int = Field(ge=1, description="Total size one key's entries may take, in bytes.")
    max_entries: int = Field(ge=1, description="How many entries one key may hold.")


class JobInputsConfig(_Strict):
    """The image store's pool for the uploads of queued async jobs: apart from URL images,
    never evicted by them; an upload lives until its job ends or its TTL runs out."""

    ttl_s: float | None = Field(
        default=None, gt=0,
        description="Seconds an upload is kept if its job never ends; default and least: "
        "jobs.result_ttl_s (a queued job lives that long).",
    )
    max_bytes: int = Field(default=1_000_000_000, ge=1,
                           description="Total size of every key's uploads; submits past it get a 503.")
    max_entries: int = Field(default=10_000, ge=1,
                             description="How many uploads are kept; submits past it get a 503.")
    per_key: StoreQuota = Field(
        default_factory=lambda: StoreQuota(max_bytes=200_000_000, max_entries=1_000),
        description="One API key's share (not with keys off); its submits past it get a 429.",
    )


class ImageStoreConfig(_Strict):
    """Where images answered by URL (``response_format: "url"``) and the uploads of queued
    jobs are kept."""

    backend: str = Field(
        default="memory",
        description="'memory' (in the store replica: lost when it restarts) or an fsspec URL, "
        "which a restarted store replica reads back: a directory "
        "('file:///var/lib/serve-app/images') or a bucket ('s3://bucket/images', needs s3fs).",
    )
    ttl_s: float = Field(default=3600, gt=0, description="Seconds an image stays downloadable.")
    max_bytes: int = Field(
        default=1_000_000_000, ge=1,
        description="Total size of every key's images; a key's own oldest go first, never "
        "another key's (past it with others' images: 503).",
    )
    max_entries: int = Field(
        default=100_000, ge=1,
        description="How many images are kept, as max_bytes (each costs memory beyond its bytes).",
    )
    per_key: StoreQuota = Field(
        default_factory=lambda: StoreQuota(max_bytes=250_000_000, max_entries=25_000),
        description="One API key's share of the images (not with keys off: the anonymous "
        "caller has the whole store); past it, the key's own oldest images go.",
    )
    job_inputs: JobInputsConfig = Field(default_factory=JobInputsConfig)
    call_timeout_s: float = Field(
        default=10.0, gt=0,
        description="Seconds a call to the store may take; past it the request is a 503 "
        "(a job's run: retried).",
    )
    public_base_url: str | None = Field(
        default=None,
        description="Base of the returned URLs (behind a proxy); default: the request's own.",
    )
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.1, num_replicas=1, max_ongoing_requests=256)
    )

    @model_validator(mode="after")
    def _one_replica(self) -> ImageStoreConfig:
        if self.deployment.autoscaling_config is not None or (self.deployment.num_replicas or 1) != 1:
            raise ValueError("image_store.deployment must have exactly one replica (num_replicas: 1)")
        return self

    def inputs_ttl_s(self, jobs: JobsConfig | None) -> float:
        """How long a job's upload is kept: ``job_inputs.ttl_s``, else the jobs' own TTL."""
        if self.job_inputs.ttl_s is not None:
            return self.job_inputs.ttl_s
        return jobs.result_ttl_s if jobs is not None else self.ttl_s

    def spec(self, jobs: JobsConfig | None = None):
        """The store deployment's settings (``jobs``: the app's, for the uploads' TTL)."""
        from deployments.store.image_store import Limits, PoolSpec, StoreSpec

        inputs = self.job_inputs
        return StoreSpec(
            backend=self.backend,
            images=PoolSpec(self.ttl_s, Limits(self.max_bytes, self.max_entries),
                            Limits(self.per_key.max_bytes, self.per_key.max_entries)),
            inputs=PoolSpec(self.inputs_ttl_s(jobs), Limits(inputs.max_bytes, inputs.max_entries),
                            Limits(inputs.per_key.max_bytes, inputs.per_key.max_entries)),
        )


class WebhooksConfig(_Strict):
    """Where job webhooks may go and how they are signed and retried."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts webhooks may be posted to over https: names, or '*.domain'.",
    )
    allowed_http_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts webhooks may be posted to over plain http (a laptop's localhost).",
    )
    allowed_ports: list[int | str] = Field(
        default_factory=lambda: [80, 443],
        description="Ports webhooks may be posted to: numbers, or 'low-high' ranges. The list "
        "replaces the default, so keep 80 and 443 in it if they are still wanted.",
    )
    allowed_internal: list[str] = Field(
        default_factory=list,
        description="Loopback, private, link-local, multicast, reserved or unspecified "
        "addresses webhooks may reach anyway: networks ('10.1.0.0/16', '::1') or host names "
        "(any address that name resolves to). Every other such address is refused, checked "
        "on the address the host name resolves to when the webhook is posted.",
    )
    secret: SecretStr | None = Field(
        default=None,
        description="Signing secret, 'whsec_' + base64 (Standard Webhooks); else the "
        "SERVE_APP_WEBHOOK_SECRET environment variable.",
    )
    key_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="A signing secret per API key: the key's SHA-256 (hex, as the job records "
        "keep it) to its secret ('whsec_' + base64; ${VAR} is read from the environment). "
        "The jobs of a key not listed are signed with 'secret'.",
    )
    max_attempts: int = Field(default=5, ge=1, le=20, description="Deliveries tried per job.")
    backoff_s: float = Field(default=2.0, gt=0, description="Wait before the 2nd attempt; doubles.")
    timeout_s: float = Field(
        default=10.0, gt=0,
        description="Seconds one attempt may take in all: resolving, connecting, sending and "
        "reading the answer.",
    )
    max_response_bytes: int = Field(
        default=4096, ge=0,
        description="Bytes of a receiver's answer read at most; the connection is closed then.",
    )

    @field_validator("allowed_ports")
    @classmethod
    def _ports(cls, ports: list[int | str]) -> list[int | str]:
        for port in ports:
            low, _, high = str(port).partition("-")
            try:
                low_n, high_n = int(low), int(high or low)
            except ValueError:
                raise ValueError(f"port {port!r}: expected a number or 'low-high'") from None
            if not 1 <= low_n <= high_n <= 65535:
                raise ValueError(f"port {port!r}: expected 1-65535, low <= high")
        return ports

    @field_validator("allowed_internal")
    @classmethod
    def _internal(cls, entries: list[str]) -> list[str]:
        import ipaddress
        import re

        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\.?", entry):
                    raise ValueError(f"{entry!r}: expected a network (CIDR), an address or a "
                                     "host name") from None
        return entries

    @field_validator("key_secrets")
    @classmethod
    def _key_hashes(cls, secrets: dict[str, SecretStr]) -> dict[str, SecretStr]:
        import re

        for digest in secrets:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{digest[:12]!r}...: expected an API key's SHA-256, 64 lowercase "
                                 "hex digits (printf %s KEY | sha256sum)")
        return secrets


class JobsConfig(_Strict):
    """The asynchronous jobs API (``/v1/images/jobs``) and its broker."""

    broker_url: str = Field(
        default="filesystem://",
        description="Celery broker: 'redis://host:6379/0' (${VAR} is read from the "
        "environment), or 'filesystem://' (files under data_folder: no server needed).",
    )
    backend_url: str | None = Field(
        default=None,
        description="Where job state is kept (Celery result backend); default: the Redis "
        "broker itself, or 'file://<data_folder>/state' for the filesystem broker.",
    )
    data_folder: str = Field(
        default="/tmp/serve-app-jobs",
        description="The filesystem broker's and state's folder: created private to the "
        "server's user (0700); refused if another user owns it or others may write to it.",
    )
    queue: str = Field(default="images-jobs", min_length=1, description="Queue name.")
    max_retries: int = Field(default=3, ge=0, le=20,
                             description="Runs after the first when a job fails for the server's reasons.")
    result_ttl_s: float = Field(default=86400, gt=0, description="Seconds a finished job is kept.")
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.1, num_replicas=1, max_ongoing_requests=4),
        description="The consumer deployment; its max_ongoing_requests is how many jobs a "
        "replica runs at once (Serve hands it to Celery as the worker's concurrency). With an "
        "autoscaling_config it scales on the jobs queued and running (serve_app/jobs/autoscaling.py).",
    )
    autoscaling_poll_s: float = Field(
        default=5.0, gt=0, description="How often the consumer's autoscaling policy counts the jobs."
    )

    @property
    def broker(self) -> str:
        """``broker_url`` with ``${VAR}`` taken from the environment (a password from a
        Kubernetes secret)."""
        return os.path.expandvars(self.broker_url)

    @property
    def state_url(self) -> str:
        if self.backend_url:
            return os.path.expandvars(self.backend_url)
        if self.broker_url.startswith("filesystem://"):
            return f"file://{self.data_folder}/state"
        return self.broker


# Deployment names the app builder uses itself; a model may not take one.
INGRESS_NAME = "ImagesIngress"
STORE_NAME = "ImageStore"
SAFETY_NAME = "SafetyChecker"
JOBS_NAME = "JobsConsumer"
RESERVED_NAMES = (INGRESS_NAME, STORE_NAME, SAFETY_NAME, JOBS_NAME)


class SafetyConfig(_WeightsReplica):
    """The optional safety checker: Stable Diffusion's NSFW classifier on every output."""

    source: SourceField = Field(
        default=FAMILIES[SAFETY_CHECKER].hub_source,
        validate_default=True,
        description="Hub id or local folder of the checker's weights, or 'tiny:safety-checker'.",
    )
    policy: Literal["flag", "blur", "reject"] = Field(
        default="blur",
        description="What happens to a flagged image of a request with moderation 'auto': "
        "'flag' returns it marked nsfw, 'blur' returns it blurred and marked, 'reject' "
        "answers the request with 400 moderation_blocked.",
    )
    allow_low: bool = Field(
        default=False,
        description="Let any caller ask for moderation 'low' (images are checked and marked but "
        "returned as made). Otherwise 'low' is a 400 naming the field, but for the keys of "
        "allow_low_keys.",
    )
    allow_low_keys: list[str] = Field(
        default_factory=list,
        description="Names of API keys that may ask for moderation 'low' (a key is named by its "
        "entry NAME:KEY in SERVE_APP_API_KEYS or SERVE_APP_API_KEYS_FILE); an ingress whose "
        "keys have none of these names refuses to start.",
    )
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.5, max_ongoing_requests=32)
    )

    @model_validator(mode="after")
    def _check(self) -> SafetyConfig:
        if self.source.stand_in and self.source.family != SAFETY_CHECKER:
            raise ValueError(f"source {str(self.source)!r}: use '{self.source.kind}:{SAFETY_CHECKER}'")
        if self.batching.mode == "step":
            raise ValueError("batching.mode: the safety checker batches by request only")
        return self

    def pipeline_spec(self) -> PipelineSpec:
        return self._spec(name=SAFETY_NAME, family=SAFETY_CHECKER)


_MEMORY_UNITS = {
    "": 1, "B": 1,
    "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
    "T": 10**12, "TB": 10**12,
    "KI": 2**10, "KIB": 2**10, "MI": 2**20, "MIB": 2**20, "GI": 2**30, "GIB": 2**30,
    "TI": 2**40, "TIB": 2**40,
}


def parse_memory(text: str) -> int:
    """Bytes of a memory size such as ``"24GiB"``, ``"80GB"``, ``"48Gi"`` or ``"16G"``
    (Kubernetes convention: G and GB are 10^9 bytes, Gi and GiB 2^30)."""
    value = str(text).strip()
    number = value.rstrip("KMGTBikmgtb ")
    unit = value[len(number):].strip().upper()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if amount <= 0 or unit not in _MEMORY_UNITS:
        raise ValueError(f"memory {text!r}: expected a size such as '24GiB', '80GB' or '48Gi'")
    return int(amount * _MEMORY_UNITS[unit])


class GpuConfig(_Strict):
    """The GPU a config is sized for (``serve-app capacity`` checks that it fits)."""

    name: str = Field(min_length=1, description="GPU model, e.g. 'NVIDIA L4' or 'NVIDIA A10G'.")
    memory: str = Field(
        description="Memory of one GPU, e.g. '24GiB' (GiB/Gi are 2^30 bytes, GB/G 10^9)."
    )

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        parse_memory(value)
        return value

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory)


class AppConfig(_Strict):
    """The ``args`` of ``serve_app.app:build_app``."""

    default_model: str = Field(
        default="stable-diffusion-2-1", description="Model used when a request names none."
    )
    default_upscaler: str | None = Field(
        default=None, description="Model of /v1/images/upscale when a request names none."
    )
    models: list[ModelConfig] = Field(min_length=1, description="Pipelines, one deployment each.")
    chains: list[RefinerChainConfig] = Field(
        default_factory=list, description="Served names that chain base -> refiner."
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    image_store: ImageStoreConfig = Field(default_factory=ImageStoreConfig)
    jobs: JobsConfig | None = Field(
        default=None, description="The asynchronous jobs API; leave out to serve without it."
    )
    safety: SafetyConfig | None = Field(
        default=None, description="The safety checker; leave out to serve without one."
    )
    gpu: GpuConfig | None = Field(
        default=None,
        description="The GPU each replica's num_gpus is a share of ({name, memory}); "
        "`serve-app capacity` fails when a replica's estimated peak memory exceeds its share.",
    )

    @model_validator(mode="after")
    def _check_job_inputs(self) -> AppConfig:
        """A queued job's upload must outlive the job's record, and fit its key's share."""
        inputs, jobs = self.image_store.job_inputs, self.jobs
        if jobs is None:
            return self
        if inputs.ttl_s is not None and inputs.ttl_s < jobs.result_ttl_s:
            raise ValueError(f"image_store.job_inputs.ttl_s ({inputs.ttl_s:g}) must be at least "
                             f"jobs.result_ttl_s ({jobs.result_ttl_s:g}): a queued job needs its upload")
        upload = self.ingress.max_upload_bytes
        for name, value in (("max_bytes", inputs.max_bytes), ("per_key.max_bytes", inputs.per_key.max_bytes)):
            if value < upload:
                raise ValueError(f"image_store.job_inputs.{name} ({value}) must be at least "
                                 f"ingress.max_upload_bytes ({upload}): one job's uploads must fit")
        return self

    @model_validator(mode="after")
    def _check_names(self) -> AppConfig:
        seen: dict[str, str] = {}
        for entry in [*self.models, *self.chains]:
            if entry.name in RESERVED_NAMES:
                raise ValueError(f"model name {entry.name!r} is reserved for the app's own deployments")
            for name in [entry.name, *entry.aliases]:
                if name in seen:
                    raise ValueError(f"name {name!r} is used by both {seen[name]!r} and {entry.name!r}")
                seen[name] = entry.name
        models = {m.name: m for m in self.models}
        for chain in self.chains:
            base, refiner = models.get(chain.base), models.get(chain.refiner)
            if refiner is None or "refine" not in refiner.capabilities:
                raise ValueError(
                    f"chain {chain.name!r}: refiner {chain.refiner!r} must name an sdxl-refiner model"
                )
            # The refiner continues the base's latents: one latent space.
            if (base is None or "text-to-image" not in base.capabilities
                    or base.info.latent_space != refiner.info.latent_space):
                raise ValueError(f"chain {chain.name!r}: base {chain.base!r} must name an sdxl model")
        if self.default_model not in seen:
            raise ValueError(f"default_model {self.default_model!r} is not a configured model")
        if self.default_upscaler is not None:
            upscaler = models.get(seen.get(self.default_upscaler, ""))
            if upscaler is None or "upscale" not in upscaler.capabilities:
                raise ValueError(f"default_upscaler {self.default_upscaler!r} is not an upscaler model")
        return self

    def prompted_model(self, entry: ModelConfig | RefinerChainConfig) -> ModelConfig:
        """The model that reads a served entry's prompt and adapters: itself, or the base
        of a refiner chain."""
        return self.model(entry.base) if isinstance(entry, RefinerChainConfig) else entry

    def model(self, name: str) -> ModelConfig:
        """The pipeline model called ``name`` (its served name)."""
        for entry in self.models:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def resolve(
        self, name: str | None, default: str | None = None
    ) -> ModelConfig | RefinerChainConfig | None:
        """Find a served model or chain by name or alias; ``None`` picks ``default``
        (the configured default model unless given)."""
        wanted = name or default or self.default_model
        for entry in [*self.models, *self.chains]:
            if wanted == entry.name or wanted in entry.aliases:
                return entry
        return None

    def served_names(self) -> list[str]:
        return [entry.name for entry in [*self.models, *self.chains]]

    @property
    def grpc_message_bytes(self) -> int:
        """The gRPC message size Serve's proxy must take for this app
        (``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, set by every profile): its largest request
        (``ingress.max_upload_bytes`` of images and the rest of the message) and its largest
        answer (one image at the largest output, as an unfiltered PNG: 3 bytes a pixel, a
        filter byte a row, chunk overhead), rounded up to MiB. Anything larger is refused by
        the proxy before the ingress (and its key check) sees it."""
        largest = max(
            (m.max_output_pixels if "upscale" in m.capabilities else size_rules.output_pixels(m.limits))
            for m in self.models
        )
        need = max(self.ingress.max_upload_bytes + 2**20, largest * 3 + 16384 + 64 * 1024)
        return -(-need // 2**20) * 2**20

    def on_demand_deployments(self) -> frozenset[str]:
        """The model deployments (and the safety checker) that may have no replica running."""
        names = {model.name for model in self.models if model.deployment.scales_to_zero}
        if self.safety is not None and self.safety.deployment.scales_to_zero:
            names.add(SAFETY_NAME)
        return frozenset(names)


class ConfigError(ValueError):
    """An invalid application config, with every problem listed by its path."""


def load_app_config(args: dict[str, Any] | AppConfig) -> AppConfig:
    """Validate Serve ``args`` into an :class:`AppConfig`, with a readable error."""
    if isinstance(args, AppConfig):
        return args
    try:
        return AppConfig.model_validate(args or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            path = ".".join(str(part) for part in err["loc"]) or "(top level)"
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {path}: {message}")
        raise ConfigError("invalid serve_app config:\n" + "\n".join(lines)) from None
