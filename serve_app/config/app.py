"""The app config itself (``AppConfig``: the ``args`` of a Serve config file), the checks
across its sections, and ``load_app_config``, which turns pydantic's errors into one
:class:`ConfigError` listing every problem by its path."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator

from serve_app.config.base import Strict
from serve_app.config.gpu import GpuConfig
from serve_app.config.ingress import ImageStoreConfig, IngressConfig
from serve_app.config.jobs import JobsConfig
from serve_app.config.models import ModelConfig, RefinerChainConfig, SafetyConfig
from serve_app.config.names import RESERVED_NAMES, SAFETY_NAME
from serve_app.protocol import sizes as size_rules


class AppConfig(Strict):
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
