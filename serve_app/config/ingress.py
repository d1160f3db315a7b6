"""The HTTP ingress (``ingress``) and the image store (``image_store``): the store keeps
images answered by URL and the uploads of queued jobs, each pool with a share per API key."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from serve_app.config.defaults import IMAGE_STORE_PER_KEY, INGRESS_GRACE_MARGIN_S, JOB_INPUTS_PER_KEY
from serve_app.config.base import Strict
from serve_app.config.options import DeploymentOptions, section_default
from serve_app.protocol.request import MAX_PROMPT_CHARS

if TYPE_CHECKING:
    from serve_app.config.jobs import JobsConfig


class IngressConfig(Strict):
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

    deployment: DeploymentOptions = Field(default_factory=section_default("ingress"))
    png_encoder: Literal["fpng", "zlib"] = Field(
        default="fpng",
        description="PNG encoder: 'fpng' (fast, files a little larger) or 'zlib' (Pillow at "
        "png_compress_level: slower, the smallest files); docs/benchmarks.md times both.",
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

    def serve_options(self) -> dict[str, Any]:
        """The ingress's Serve options. Unless the config writes its own, the grace period of
        a stopping ingress replica (a redeploy, a scale-down) outlasts ``request_timeout_s``:
        Serve force-kills a replica at the end of it, and a request still waiting on a model
        that is itself being replaced would be lost as a bare 500 instead of answered."""
        options = self.deployment.serve_options()
        options.setdefault("graceful_shutdown_timeout_s", self.request_timeout_s + INGRESS_GRACE_MARGIN_S)
        return options


class StoreQuota(Strict):
    """How much one API key's share of a pool of the image store may hold."""

    max_bytes: int = Field(ge=1, description="Total size one key's entries may take, in bytes.")
    max_entries: int = Field(ge=1, description="How many entries one key may hold.")


class JobInputsConfig(Strict):
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
        default_factory=functools.partial(StoreQuota, **JOB_INPUTS_PER_KEY),
        description="One API key's share (not with keys off); its submits past it get a 429.",
    )


class ImageStoreConfig(Strict):
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
        default_factory=functools.partial(StoreQuota, **IMAGE_STORE_PER_KEY),
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
    deployment: DeploymentOptions = Field(default_factory=section_default("image_store"))

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
