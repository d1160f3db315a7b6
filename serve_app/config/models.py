"""The served models: a pipeline with its own deployment (``models``), a refiner chain over
two of them (``chains``), their LoRA adapters, and the safety checker (``safety``).

One module for what a served name is, the checks across its sections (family, sizes,
adapters, batching) included: ModelConfig alone is half of it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from deployments.contract import MAX_HUB_LORA_BYTES, LoraRef, PipelineSpec
from deployments.families import FAMILIES, SAFETY_CHECKER, SERVED_FAMILIES, component_for, family_of_source
from deployments.sources import Source
from serve_app.config.base import SourceField, Strict
from serve_app.config.generation import GenerationDefaults, GenerationLimits
from serve_app.config.names import SAFETY_NAME
from serve_app.config.options import DeploymentOptions, section_default
from serve_app.config.replica import WeightsReplica
from serve_app.protocol.request import LORA_WEIGHT_MAX, LORA_WEIGHT_MIN, MAX_LORAS, MAX_STEPS
from serve_app.protocol.sizes import parse_size

# The name of a served family (deployments/families.py's registry holds the Family itself).
FamilyName = Literal[SERVED_FAMILIES]  # type: ignore[valid-type]


class LoraAdapterConfig(Strict):
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


class FusedLoraConfig(Strict):
    """An adapter of ``loras`` merged into the model's weights at load."""

    name: str = Field(min_length=1, description="An adapter of the model's `loras`.")
    weight: float | None = Field(
        default=None, ge=LORA_WEIGHT_MIN, le=LORA_WEIGHT_MAX,
        description="Its weight in the merge (default: its default_weight).",
    )


class _Served(Strict):
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


class ModelConfig(_Served, WeightsReplica):
    """A pipeline served by its own deployment."""

    family: FamilyName = Field(
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
    lora_slots: int | None = Field(
        default=None, ge=1, le=MAX_LORAS,
        description="Adapter slots of each replica's UNet: the most distinct adapters one "
        "batch runs together (requests of different adapters share a UNet call, each row "
        "with its own). Default: max_loras_per_request.",
    )
    lora_rank: int | None = Field(
        default=None, ge=1, le=1024,
        description="The LoRA rank the slots are padded to: a Hub LoRA of a higher rank is a "
        "400 naming `loras`. Default: the highest rank of the configured adapters (64 with "
        "none configured).",
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
        if self.lora_slots is not None and not (
                self.max_loras_per_request <= self.lora_slots <= self.max_loaded_loras):
            raise ValueError(
                f"lora_slots ({self.lora_slots}) must be at least max_loras_per_request "
                f"({self.max_loras_per_request}), so that a request's adapters fit one call, and "
                f"at most max_loaded_loras ({self.max_loaded_loras}), so that a batch's adapters "
                "are loaded together")
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
            lora_slots=self.lora_slots or self.max_loras_per_request,
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


class SafetyConfig(WeightsReplica):
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
    deployment: DeploymentOptions = Field(default_factory=section_default("safety"))

    @model_validator(mode="after")
    def _check(self) -> SafetyConfig:
        if self.source.stand_in and self.source.family != SAFETY_CHECKER:
            raise ValueError(f"source {str(self.source)!r}: use '{self.source.kind}:{SAFETY_CHECKER}'")
        if self.batching.mode == "step":
            raise ValueError("batching.mode: the safety checker batches by request only")
        return self

    def pipeline_spec(self) -> PipelineSpec:
        return self._spec(name=SAFETY_NAME, family=SAFETY_CHECKER)
