"""The base class of every model deployment, and the text-to-image and image-to-image
methods that SD 2.1 and SDXL share.

Deployment classes are plain Python classes: the app builder binds
:class:`~deployments.host.ModelHost` with the family's class named, and the replica makes
the instance in its own process, so nothing here knows about HTTP or Ray options. The images
service calls ``run`` and ``stream`` (deployments/contract.py) through the deployment's
handle; the job's type picks the method.

One module, over 400 lines: the base class's batch path (queueing, LoRA rows, the pipeline
call) and the two mixins that call it are read together.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import time
from typing import Any, Protocol

import numpy as np
import torch

from deployments.runtime.arrays import batch_text, finish, split, to_uint8
from deployments.runtime.batching import BatchEntry, Batcher, PipelineCancelled, batch_cancelled
from deployments.contract import (JOB_METHODS, STREAMING_JOBS, PipelineSpec, StageResult,
                                  resolve_inputs)
from deployments.errors import InvalidJobError
from deployments.families import FAMILIES
from deployments.runtime.loading import cpu_threads, load_pipeline, load_preview_decoder, select_device
from deployments.runtime.loras import LoraCache, lora_identity
from deployments.runtime.metrics import ReplicaMetrics
from deployments.runtime.previews import current_sink, emit_previews, linear_previews, sink_for
from deployments.runtime.steploop import StepBatcher, StepLoop, StepSlot

# In step mode, the step-loop slot of the job this thread runs (None in request mode).
_step_slot: contextvars.ContextVar[StepSlot | None] = contextvars.ContextVar("step_slot", default=None)

def serve_metrics_available() -> bool:
    """Ray's metrics need a running Ray; deployments called directly (unit tests) skip them."""
    import ray

    return ray.is_initialized()


class PipelineDeployment:
    """Base of every model deployment: one pipeline per replica, fed by a batcher.

    Jobs go through a :class:`~deployments.runtime.batching.Batcher`: compatible concurrent jobs
    run as one pipeline call, one call at a time, in a worker thread so the replica's event
    loop keeps answering health checks and noticing cancelled callers. In step mode a
    :class:`~deployments.runtime.steploop.StepBatcher` starts each job on a thread of its own and
    the :class:`~deployments.runtime.steploop.StepLoop` batches their UNet calls.
    """

    pipeline_cls: Any = None

    @property
    def upscale_factor(self) -> int | None:
        """An upscaler's factor, from the registry."""
        return FAMILIES[self.spec.family].upscale_factor

    @property
    def takes_loras(self) -> bool:
        """Runs jobs with LoRA adapters (``job.loras``): the registry's SD 2.1 and SDXL base."""
        return FAMILIES[self.spec.family].takes_loras

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self.broken: str | None = None  # set when a pipeline call loses the CUDA context
        self.dtype = select_device(spec)[1]
        self.pipe, self.device = self.load(spec)
        self.preview_decoder = load_preview_decoder(spec, self.device) if spec.preview_decoder else None
        self.metrics = ReplicaMetrics(spec.name) if serve_metrics_available() else None
        self.loras = LoraCache(self.pipe, spec, self.device, self.metrics) if self.takes_loras else None
        on_batch = self.metrics.on_batch if self.metrics else None
        self.steps: StepLoop | None = None
        if spec.batching_mode == "step":
            # A guided image is two UNet rows: max_batch_images guided images to a call.
            self.steps = StepLoop(self.pipe.unet, spec.name, 2 * spec.max_batch_images,
                                  setup=self._thread_setup,
                                  on_call=self.metrics.on_unet_call if self.metrics else None,
                                  before_call=self._weigh_step_rows if self.loras is not None else None)
            self.batcher = StepBatcher(self._run_step_job, spec.images_in_flight, spec.max_shape_wait_s,
                                       on_batch=on_batch, thread_name=f"{spec.name}-pipeline",
                                       max_adapters=self._max_adapters)
        else:
            self.batcher = Batcher(self._run_group, spec.max_batch_images, spec.batch_wait_timeout_s,
                                   on_batch=on_batch, thread_name=f"{spec.name}-pipeline",
                                   max_adapters=self._max_adapters)

    @property
    def _max_adapters(self) -> int | None:
        """Distinct LoRA adapters one call may use: the UNet's slots (None: no adapters)."""
        return self.loras.slot_count if self.loras is not None else None

    def load(self, spec: PipelineSpec):
        """Load this replica's model; returns (model, device)."""
        return load_pipeline(self.pipeline_cls, spec)

    async def _submit(self, kind: str, job, inputs: tuple, key: tuple, carried=None,
                      images: int | None = None) -> StageResult:
        """Queue a job of ``images`` images (default: one per seed); returns its
        StageResult, with the cost of earlier stages added."""
        count = len(job.seeds) if images is None else images
        adapters = self._check_loras(job)
        if self.steps is not None:  # step mode: jobs share UNet calls by latent shape
            size = tuple(inputs[0].shape[-2:]) if kind == "refine" else (job.height, job.width)
            key = (size,)
        if adapters:
            # Hub adapters' files download here, off the pipeline thread, before the job queues.
            await self.loras.fetch(job.loras)
        result = await self.batcher.submit(kind, job, inputs, key, count, preview=current_sink.get(),
                                           adapters=adapters)
        # The seeds its images were made with (batch_text's generators): the response's labels.
        result = dataclasses.replace(result, seeds=tuple(getattr(job, "seeds", ())))
        if getattr(job, "output_latents", False):
            result = dataclasses.replace(result, latent_space=FAMILIES[self.spec.family].latent_space)
        return result.plus(carried)

    def _check_loras(self, job) -> frozenset:
        """The adapters ``job.loras`` uses, as the batchers count them against the UNet's
        slots (checked here, on the event loop, before the job queues; ``_submit`` then
        fetches Hub adapters' files); loading and copying into slots happen on the pipeline
        thread. Adapters do not split batches: rows of one call run different adapters."""
        refs = getattr(job, "loras", ())
        if not refs:
            return frozenset()
        if self.loras is None:  # guard for callers other than the ingress (planning refuses it)
            raise InvalidJobError(f"{self.spec.name} takes no LoRA adapters", param="loras")
        self.loras.check(refs)
        return lora_identity(refs)

    def _weigh_step_rows(self, slots: list[StepSlot], rows: list[int]) -> None:
        """Step mode, before each UNet call (the loop holds the device): each job's rows run
        its adapters at its weights."""
        self.loras.weigh_unet([(slot.lora or {}, count) for slot, count in zip(slots, rows)])

    def check_latents(self, latents: torch.Tensor, carried: StageResult | None) -> None:
        """Latents handed over from another stage must be of this model's latent space:
        another VAE's latents decode to wrong images without any error."""
        # A guard for callers other than the ingress (planning hands latents only within a
        # space): the GPU would decode wrong images without any error.
        mine = FAMILIES[self.spec.family].latent_space
        theirs = carried.latent_space if carried is not None else None
        if theirs is not None and theirs != mine:
            raise InvalidJobError(
                f"{self.spec.name} works in the {mine} latent space; it was handed "
                f"{theirs} latents (hand over images instead)"
            )

    def _method_for(self, job) -> Any:
        """The method of this deployment that runs ``job`` (by its type, per the contract)."""
        name = JOB_METHODS.get(type(job))
        method = getattr(self, name, None) if name is not None else None
        if method is None:
            raise InvalidJobError(f"{self.spec.name} does not run {type(job).__name__}")
        return method

    async def run(self, job, *inputs) -> StageResult:
        """Run ``job`` on ``inputs``: the one entry point the ingress calls."""
        method = self._method_for(job)
        return await method(job, *await resolve_inputs(inputs))

    async def stream(self, job, *inputs, partial_images: int = 0):
        """Run a text-to-image or image-to-image job, yielding ``("partial", index,
        pixels)`` previews during denoising, then ``("final", result)``.

        Called through a streaming handle (``handle.options(stream=True)``).
        """
        if not isinstance(job, STREAMING_JOBS):
            raise InvalidJobError(f"{type(job).__name__} does not stream", param="stream")
        method = self._method_for(job)
        inputs = await resolve_inputs(inputs)
        queue: asyncio.Queue = asyncio.Queue()
        token = current_sink.set(sink_for(queue, partial_images))
        try:
            task = asyncio.ensure_future(method(job, *inputs))
        finally:
            current_sink.reset(token)
        task.add_done_callback(lambda t: queue.put_nowait(("done", None, None)))
        try:
            while True:
                kind, index, pixels = await queue.get()
                if kind == "done":
                    break
                yield ("partial", index, pixels)
            yield ("final", task.result())
        finally:
            task.cancel()

    def _pipeline(self, name: str = "pipe") -> Any:
        """The pipeline ``name`` (``pipe``, ``img2img``, ``inpaint``) as this thread's job runs
        it: the replica's own, or in step mode the job's view of it (deployments/runtime/steploop.py)."""
        pipe, slot = getattr(self, name), _step_slot.get()
        return pipe if slot is None else self.steps.view(pipe, slot)

    def _thread_setup(self) -> None:
        if self.device == "cpu":
            # OpenMP's thread count is per OS thread, and a worker thread inherits Ray's
            # OMP_NUM_THREADS (1 for a fraction of a CPU): set it where torch runs.
            torch.set_num_threads(cpu_threads(self.spec))

    def _run_step_job(self, entry: BatchEntry) -> tuple[Any, int, float]:
        """Step mode, on the job's own thread: the job's pipeline call, through the step
        loop; returns (output, denoising steps of its images, its model seconds)."""
        slot = StepSlot(cancelled=entry.token.is_set, arrived=entry.queued_at,
                        on_first_step=lambda now: self.batcher.stats.first_step(entry.queued_at, now))
        token = _step_slot.set(slot)
        try:
            (output,) = self.steps.join(slot, lambda: self._run_batch(entry.kind, [entry]))
        finally:
            _step_slot.reset(token)
        if isinstance(output, BaseException):
            raise output
        return output, slot.calls * entry.images, slot.seconds

    def _run_group(self, kind: str, entries: list[BatchEntry]) -> list[Any]:
        steps_before = self.batcher.stats.steps
        try:
            return self._run_batch(kind, entries)
        finally:
            if self.metrics is not None:
                self.metrics.on_steps(self.batcher.stats.steps - steps_before)

    def _run_batch(self, kind: str, entries: list[BatchEntry]) -> list[Any]:
        """One pipeline call for ``entries``; one result per entry, or the error of an entry
        whose adapters failed to load (the others run without it)."""
        self._thread_setup()
        lease = None
        try:
            if self.loras is not None:
                # Outside inference mode: loading creates the adapters' parameters. Jobs of
                # one call may use different adapters: each row runs its job's own.
                lease = self.loras.acquire([getattr(e.job, "loras", ()) for e in entries])
                live = [i for i in range(len(entries)) if i not in lease.errors]
                if not live:
                    return [lease.errors[i] for i in range(len(entries))]
                groups = [(getattr(entries[i].job, "loras", ()), entries[i].images) for i in live]
                self.loras.encode_with(groups)
                slot = _step_slot.get()
                if slot is not None:  # step mode: the loop weighs each UNet call's rows
                    slot.lora = lease.rows[live[0]]
                else:
                    # A guided call's rows are its images twice (unconditional, then
                    # conditional); an unguided call reads the first half.
                    rows = [(lease.rows[i], entries[i].images) for i in live]
                    self.loras.weigh_unet(rows * 2)
                if len(live) < len(entries):
                    outputs = iter(self._run_kind(kind, [entries[i] for i in live]))
                    return [lease.errors[i] if i in lease.errors else next(outputs)
                            for i in range(len(entries))]
            return self._run_kind(kind, entries)
        except RuntimeError as exc:
            if "CUDA error" in str(exc):
                # The CUDA context is lost (an illegal access, a device-side assert): every
                # later call on this replica would fail too; let Serve replace it.
                self.broken = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if lease is not None:
                self.loras.release(lease)

    def _run_kind(self, kind: str, entries: list[BatchEntry]) -> list[Any]:
        with torch.inference_mode():
            return getattr(self, f"_batch_{kind}")(entries)

    def _step_callback(self, entries: list[BatchEntry]):
        """``callback_on_step_end``: stop when every caller of the batch has gone."""
        stats = self.batcher.stats
        streams = any(entry.preview is not None for entry in entries)
        if self.preview_decoder is not None:
            to_rgb = self._decode_previews
        else:
            to_rgb = linear_previews(FAMILIES[self.spec.family].latent_space)

        def on_step_end(pipe, step, timestep, callback_kwargs):
            stats.steps += 1
            if step == 0 and self.steps is None:  # (step mode: the step loop tells it)
                now = time.monotonic()
                for entry in entries:
                    stats.first_step(entry.queued_at, now)
            if batch_cancelled(entries):
                raise PipelineCancelled(f"{self.spec.name}: all callers gone at step {step}")
            if streams and "latents" in callback_kwargs:
                emit_previews(entries, callback_kwargs["latents"], step, pipe.num_timesteps, to_rgb)
            return {}

        return on_step_end

    def _decode_previews(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 RGB at full resolution through the tiny autoencoder (TAESD takes
        the UNet's latents as they are: its scaling factor is 1)."""
        decoder = self.preview_decoder
        pixels = decoder.decode(latents.to(decoder.device, decoder.dtype)).sample
        return to_uint8(((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy())

    def _legacy_step_callback(self, entries: list[BatchEntry]):
        """The older ``callback(step, timestep, latents)`` of the upscale pipelines."""
        on_step_end = self._step_callback(entries)
        return lambda step, timestep, latents: on_step_end(None, step, timestep, {})

    async def stats(self) -> dict[str, Any]:
        """Batching and cancellation counters of this replica, and its Serve replica id
        ("local" when called directly)."""
        replica = "local"
        if serve_metrics_available():
            from ray import serve

            with contextlib.suppress(Exception):  # not inside a Serve replica
                replica = serve.get_replica_context().replica_id.unique_id
        steps = dataclasses.asdict(self.steps.stats) if self.steps is not None else {}
        return {**dataclasses.asdict(self.batcher.stats), **steps, "replica": replica}

    async def ready(self) -> str:
        """Answers once the pipeline is loaded (the constructor has returned)."""
        return self.spec.name

    def check_health(self) -> None:
        """Serve's health check: unhealthy once a pipeline call lost the CUDA context (a
        CUDA error), so that Serve replaces the replica instead of failing every request."""
        if self.broken is not None:
            raise RuntimeError(f"{self.spec.name}: {self.broken}")


class DenoisingReplica(Protocol):
    """What :class:`TextToImageMixin` and :class:`ImageToImageMixin` use of the class they are
    mixed into, and all they use of it: :class:`PipelineDeployment` has every member
    (tests/unit/test_deployments.py checks both). Each mixin method declares it as its
    ``self``'s type."""

    spec: PipelineSpec
    pipe: Any
    pipeline_cls: Any
    dtype: torch.dtype

    async def _submit(self, kind: str, job, inputs: tuple, key: tuple, carried=None,
                      images: int | None = None) -> StageResult: ...

    def _step_callback(self, entries: list[BatchEntry]) -> Any: ...

    def _pipeline(self, name: str = "pipe") -> Any: ...


class TextToImageMixin:
    """``text_to_image`` for pipelines called with prompt, size, steps and guidance, mixed into
    a :class:`DenoisingReplica`."""

    async def text_to_image(self: DenoisingReplica, job):
        """Run a :class:`~deployments.contract.TextToImageJob`.

        Returns a StageResult of uint8 images (N, H, W, 3), or of latents (a CPU tensor)
        when the job asks for them (a refiner or a latent upscaler continues from there).
        """
        key = (job.width, job.height, job.num_inference_steps, job.guidance_scale,
               job.denoising_end, job.output_latents, job.negative_prompt is None)
        return await self._submit("text_to_image", job, (), key)

    def _batch_text_to_image(self: DenoisingReplica, entries):
        job = entries[0].job
        kwargs: dict[str, Any] = dict(
            **batch_text(entries),
            width=job.width,
            height=job.height,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            output_type="latent" if job.output_latents else "pt",
            callback_on_step_end=self._step_callback(entries),
        )
        if job.denoising_end is not None:
            kwargs["denoising_end"] = job.denoising_end
        output = self._pipeline()(**kwargs).images
        return split(finish(output, job.output_latents), entries)


class ImageToImageMixin:
    """``image_to_image``: image-to-image, or inpainting when a mask is given, mixed into a
    :class:`DenoisingReplica`.

    Both pipelines are made with ``from_pipe`` from the text-to-image pipeline, so they
    share its modules: no second copy of the weights in memory, and the LoRA adapters loaded
    and activated through the text-to-image pipeline are in the modules they run.
    """

    img2img_cls: Any = None
    inpaint_cls: Any = None

    def _init_image_pipelines(self: DenoisingReplica) -> None:
        if self.spec.source.stand_in and not isinstance(self.pipe, self.pipeline_cls):
            self.img2img = self.inpaint = self.pipe  # a whole stand-in takes every call itself
            return
        # from_pipe casts every shared module to its dtype argument, float32 by default:
        # without it, a float16 replica would serve in float32.
        self.img2img = self.img2img_cls.from_pipe(self.pipe, dtype=self.dtype)
        self.inpaint = self.inpaint_cls.from_pipe(self.pipe, dtype=self.dtype)
        for pipe in (self.img2img, self.inpaint):
            pipe.set_progress_bar_config(disable=True)

    async def image_to_image(self: DenoisingReplica, job, image: np.ndarray,
                             mask: np.ndarray | None = None):
        """Run an :class:`~deployments.contract.ImageToImageJob` on ``image`` (H, W, 3) uint8.

        ``mask`` (H, W) uint8 marks with 255 the pixels to repaint.
        """
        # Guards for callers other than the ingress (planning checks the mask, execution
        # sizes both): a pipeline call on the GPU with inputs of another size would fail.
        if image.shape[:2] != (job.height, job.width):
            raise InvalidJobError(
                f"image is {image.shape[1]}x{image.shape[0]}, job is {job.width}x{job.height}",
                param="image",
            )
        if mask is not None and mask.shape != image.shape[:2]:
            raise InvalidJobError("mask and image sizes differ", param="mask")
        key = (job.width, job.height, job.num_inference_steps, job.guidance_scale, job.strength,
               mask is None, job.output_latents, job.negative_prompt is None)
        return await self._submit("image_to_image", job, (image, mask), key)

    def _batch_image_to_image(self: DenoisingReplica, entries):
        from PIL import Image

        job = entries[0].job
        images = [Image.fromarray(e.inputs[0]) for e in entries for _ in range(e.images)]
        kwargs: dict[str, Any] = dict(
            **batch_text(entries),
            image=images,
            strength=job.strength,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            output_type="latent" if job.output_latents else "pt",
            callback_on_step_end=self._step_callback(entries),
        )
        if entries[0].inputs[1] is None:
            output = self._pipeline("img2img")(**kwargs).images
        else:
            masks = [Image.fromarray(e.inputs[1]) for e in entries for _ in range(e.images)]
            kwargs.update(mask_image=masks, width=job.width, height=job.height)
            output = self._pipeline("inpaint")(**kwargs).images
        return split(finish(output, job.output_latents), entries)
