"""How a deployment that loads weights runs: its batching, dtype, threads and Ray options."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, model_validator

from deployments.contract import PipelineSpec, images_in_flight
from serve_app.config.base import Strict
from serve_app.config.options import DeploymentOptions


class BatchingConfig(Strict):
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
        description="'request': a batch of jobs with the same size, steps, guidance and strength "
        "runs one pipeline call to its end, whatever their LoRA adapters (up to `lora_slots` "
        "distinct ones). 'step' (SD 2.1, SDXL and its refiner): jobs join and leave a running "
        "batch at every denoising step, and jobs of one latent shape share each UNet call "
        "whatever their steps, guidance, strength, adapters or denoising start and end "
        "(deployments/runtime/steploop.py).",
    )
    max_shape_wait_s: float = Field(
        default=2.0,
        ge=0,
        description="Step mode: once a job of another shape (or with adapters beyond the free "
        "LoRA slots) has waited this long, no more jobs join the running batch, and that job "
        "goes next.",
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


class WeightsReplica(Strict):
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
