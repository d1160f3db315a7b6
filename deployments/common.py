"""Loading pipelines and running them on a replica; shared by every pipeline family.

Deployment classes are plain Python classes: the app builder wraps them with
``serve.deployment(...)`` using options from the config, so nothing here knows about
HTTP or Ray options.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deployments.batching import (
    BatchEntry,
    Batcher,
    PipelineCancelled,
    StageResult,
    batch_cancelled,
)
from deployments.errors import InvalidJobError
from deployments.families import FAMILIES
from deployments.jobs import PipelineSpec
from deployments.metrics import ReplicaMetrics
from deployments.previews import current_sink, emit_previews, linear_previews, sink_for
from deployments.tiny import materialize_tiny

logger = logging.getLogger("ray.serve")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def serve_metrics_available() -> bool:
    """Ray's metrics need a running Ray; deployments called directly (unit tests) skip them."""
    import ray

    return ray.is_initialized()


def resolve_source(source: str) -> str:
    """Turn a weights source into something ``from_pretrained`` accepts.

    ``tiny:<family>`` is built (once) into a local folder; a Hub id or a local path is
    passed through unchanged.
    """
    if source.startswith("tiny:"):
        return str(materialize_tiny(source.removeprefix("tiny:")))
    return source


def select_device(spec: PipelineSpec) -> tuple[str, torch.dtype]:
    """CUDA in ``spec.dtype`` when this replica has a GPU, else CPU in ``spec.cpu_dtype``
    (float32 by default; bfloat16 runs the half-precision paths on CPU).

    On CPU, torch gets ``spec.cpu_threads`` threads (default: every core): Ray sets
    OMP_NUM_THREADS to the replica's reserved CPUs, one thread for a fraction of a CPU,
    which halves the speed of a tiny replica on a 2-core machine.
    """
    if torch.cuda.is_available():
        return "cuda", _DTYPES[spec.dtype]
    if spec.dtype != spec.cpu_dtype:
        logger.info("%s: no GPU on this replica, running on CPU in %s", spec.name, spec.cpu_dtype)
    return "cpu", _DTYPES[spec.cpu_dtype]


def cpu_threads(spec: PipelineSpec) -> int:
    return spec.cpu_threads or os.cpu_count() or 1


def _from_pretrained_kwargs(source: str, dtype: torch.dtype, revision: str | None = None,
                            variant: str | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype}
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    if Path(source).is_dir():
        kwargs["local_files_only"] = True
    return kwargs


# torch.compile of the UNet. No CUDA graphs ("reduce-overhead" records graphs that belong
# to the thread that recorded them and to one shape each); dynamic shapes, so a new batch
# size or image size does not recompile (Dynamo gives up after 8 recompiles).
COMPILE_OPTIONS: dict[str, Any] = {"mode": "max-autotune-no-cudagraphs", "dynamic": True,
                                   "fullgraph": True}


def load_pipeline(pipeline_cls: Any, spec: PipelineSpec):
    """Load ``pipeline_cls`` from ``spec.source`` onto this replica's device.

    The same ``from_pretrained`` call serves real Hub weights, a local folder and the tiny
    models, so tests exercise the production loading path.
    """
    device, dtype = select_device(spec)
    source = resolve_source(spec.source)
    # The variant is asked for on CPU too: a folder from `serve-app fetch` may hold only
    # the variant's weights (they are cast to this replica's dtype on load).
    kwargs = _from_pretrained_kwargs(source, dtype, spec.revision, spec.variant)
    if spec.vae:
        from diffusers import AutoencoderKL

        vae_source = resolve_source(spec.vae)
        kwargs["vae"] = AutoencoderKL.from_pretrained(vae_source,
                                                      **_from_pretrained_kwargs(vae_source, dtype))
    pipe = pipeline_cls.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
    if spec.vae_slicing:
        pipe.vae.enable_slicing()
    if device == "cuda":
        # PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels).
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        if spec.cpu_offload:
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(device)
        if spec.compile:
            pipe.unet = torch.compile(pipe.unet, **COMPILE_OPTIONS)
    else:
        pipe.to(device)
    logger.info("%s: loaded %s from %s on %s (%s)", spec.name, pipeline_cls.__name__,
                spec.source, device, dtype)
    return pipe, device


def load_preview_decoder(spec: PipelineSpec, device: str):
    """The tiny autoencoder (``AutoencoderTiny``: TAESD, TAESDXL) that decodes stream previews."""
    from diffusers import AutoencoderTiny

    _, dtype = select_device(spec)
    source = resolve_source(spec.preview_decoder)
    decoder = AutoencoderTiny.from_pretrained(source, **_from_pretrained_kwargs(source, dtype))
    decoder = decoder.to(device).eval()
    logger.info("%s: stream previews decoded by %s", spec.name, spec.preview_decoder)
    return decoder


def generators(seeds: tuple[int, ...]) -> list[torch.Generator]:
    """One CPU generator per image, so image i depends only on its own seed.

    CPU generators give the same initial noise on every device, so a seed means the same
    image on a laptop and on a GPU server (up to kernel precision).
    """
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (N, H, W, C) to uint8, rounding as PIL conversion does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


class PipelineDeployment:
    """Base of every model deployment: one pipeline per replica, fed by a batcher.

    Jobs go through a :class:`~deployments.batching.Batcher`: compatible concurrent jobs
    run as one pipeline call, one call at a time, in a worker thread so the replica's event
    loop keeps answering health checks and noticing cancelled callers.
    """

    pipeline_cls: Any = None

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self.dtype = select_device(spec)[1]
        self.pipe, self.device = self.load(spec)
        self.preview_decoder = load_preview_decoder(spec, self.device) if spec.preview_decoder else None
        self.metrics = ReplicaMetrics(spec.name) if serve_metrics_available() else None
        self.batcher = Batcher(
            self._run_group,
            spec.max_batch_images,
            spec.batch_wait_timeout_s,
            on_batch=self.metrics.on_batch if self.metrics else None,
            thread_name=f"{spec.name}-pipeline",
        )

    def load(self, spec: PipelineSpec):
        """Load this replica's model; returns (model, device)."""
        return load_pipeline(self.pipeline_cls, spec)

    async def _submit(self, kind: str, job, inputs: tuple, key: tuple, carried=None,
                      images: int | None = None) -> StageResult:
        """Queue a job of ``images`` images (default: one per seed); returns its
        StageResult, with the cost of earlier stages added."""
        count = len(job.seeds) if images is None else images
        result = await self.batcher.submit(kind, job, inputs, key, count, preview=current_sink.get())
        if getattr(job, "output_latents", False):
            result = dataclasses.replace(result, latent_space=FAMILIES[self.spec.family].latent_space)
        return result.plus(carried)

    def check_latents(self, latents: torch.Tensor, carried: StageResult | None) -> None:
        """Latents handed over from another stage must be of this model's latent space:
        another VAE's latents decode to wrong images without any error."""
        mine = FAMILIES[self.spec.family].latent_space
        theirs = carried.latent_space if carried is not None else None
        if theirs is not None and theirs != mine:
            raise InvalidJobError(
                f"{self.spec.name} works in the {mine} latent space; it was handed "
                f"{theirs} latents (hand over images instead)"
            )

    async def stream(self, method: str, job, *inputs, partial_images: int = 0):
        """Run ``method`` (``text_to_image`` or ``image_to_image``) on one job, yielding
        ``("partial", index, pixels)`` previews during denoising, then ``("final", result)``.

        Called through a streaming handle (``handle.options(stream=True)``).
        """
        if method not in ("text_to_image", "image_to_image"):
            raise InvalidJobError(f"{method} does not stream", param="stream")
        queue: asyncio.Queue = asyncio.Queue()
        token = current_sink.set(sink_for(queue, partial_images))
        try:
            task = asyncio.ensure_future(getattr(self, method)(job, *inputs))
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

    def _run_group(self, kind: str, entries: list[BatchEntry]) -> list[Any]:
        if self.device == "cpu":
            # OpenMP's thread count is per OS thread, and this worker thread inherits Ray's
            # OMP_NUM_THREADS (1 for a fraction of a CPU): set it here, where torch runs.
            torch.set_num_threads(cpu_threads(self.spec))
        with torch.inference_mode():
            return getattr(self, f"_batch_{kind}")(entries)

    def _step_callback(self, entries: list[BatchEntry]):
        """``callback_on_step_end``: stop when every caller of the batch has gone."""
        stats = self.batcher.stats

        metrics = self.metrics

        streams = any(entry.preview is not None for entry in entries)
        if self.preview_decoder is not None:
            to_rgb = self._decode_previews
        else:
            to_rgb = linear_previews(FAMILIES[self.spec.family].latent_space)

        def on_step_end(pipe, step, timestep, callback_kwargs):
            stats.steps += 1
            if metrics is not None:
                metrics.on_step()
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
        """Batching and cancellation counters of this replica."""
        return dataclasses.asdict(self.batcher.stats)

    async def ready(self) -> str:
        """Answers once the pipeline is loaded (the constructor has returned)."""
        return self.spec.name

    def check_health(self) -> None:
        """Serve's health check: the replica is unhealthy if its pipeline is gone."""
        if self.pipe is None:
            raise RuntimeError(f"{self.spec.name}: pipeline not loaded")


def images_to_float(images: np.ndarray, count: int) -> np.ndarray:
    """uint8 (H, W, 3) or (N, H, W, 3) to float32 (count, H, W, 3) in [0, 1].

    A single image is repeated ``count`` times (one per seed); a batch must already hold
    ``count`` images.
    """
    if images.ndim == 3:
        images = np.repeat(images[None], count, axis=0)
    if images.shape[0] != count:
        raise InvalidJobError(f"expected {count} images, got {images.shape[0]}")
    return images.astype(np.float32) / 255.0


def finish(output, output_latents: bool):
    """Latents go to the next replica as float32 CPU tensors; images leave as uint8."""
    if output_latents:
        return output.to("cpu", torch.float32)
    return to_uint8(output)


def split(output, entries: list[BatchEntry]) -> list[Any]:
    """Cut a batch's output into each job's images, in order."""
    parts, start = [], 0
    for entry in entries:
        parts.append(output[start : start + entry.images])
        start += entry.images
    return parts


def batch_text(entries: list[BatchEntry]) -> dict[str, Any]:
    """Prompts, negative prompts and generators of a batch, one per image.

    Jobs batch together only when all or none have a negative prompt (SDXL treats a
    missing one differently from an empty one), so None stays None.
    """
    prompts = [e.job.prompt for e in entries for _ in range(e.images)]
    negatives = None
    if entries[0].job.negative_prompt is not None:
        negatives = [e.job.negative_prompt for e in entries for _ in range(e.images)]
    seeds = tuple(seed for e in entries for seed in e.job.seeds)
    return {"prompt": prompts, "negative_prompt": negatives, "generator": generators(seeds)}


class TextToImageMixin:
    """``text_to_image`` for pipelines called with prompt, size, steps and guidance."""

    async def text_to_image(self, job):
        """Run a :class:`~deployments.jobs.TextToImageJob`.

        Returns a StageResult of uint8 images (N, H, W, 3), or of latents (a CPU tensor)
        when the job asks for them (a refiner or a latent upscaler continues from there).
        """
        key = (job.width, job.height, job.num_inference_steps, job.guidance_scale,
               job.denoising_end, job.output_latents, job.negative_prompt is None)
        return await self._submit("text_to_image", job, (), key)

    def _batch_text_to_image(self, entries):
        job = entries[0].job
        kwargs: dict[str, Any] = dict(
            **batch_text(entries),
            width=job.width,
            height=job.height,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            output_type="latent" if job.output_latents else "np",
            callback_on_step_end=self._step_callback(entries),
        )
        if job.denoising_end is not None:
            kwargs["denoising_end"] = job.denoising_end
        output = self.pipe(**kwargs).images
        return split(finish(output, job.output_latents), entries)


class ImageToImageMixin:
    """``image_to_image``: image-to-image, or inpainting when a mask is given.

    Both pipelines are made with ``from_pipe`` from the text-to-image pipeline, so they
    share its modules: no second copy of the weights in memory.
    """

    img2img_cls: Any = None
    inpaint_cls: Any = None

    def _init_image_pipelines(self) -> None:
        # from_pipe casts every shared module to its dtype argument, float32 by default:
        # without it, a float16 replica would serve in float32.
        self.img2img = self.img2img_cls.from_pipe(self.pipe, dtype=self.dtype)
        self.inpaint = self.inpaint_cls.from_pipe(self.pipe, dtype=self.dtype)
        for pipe in (self.img2img, self.inpaint):
            pipe.set_progress_bar_config(disable=True)

    async def image_to_image(self, job, image: np.ndarray, mask: np.ndarray | None = None):
        """Run an :class:`~deployments.jobs.ImageToImageJob` on ``image`` (H, W, 3) uint8.

        ``mask`` (H, W) uint8 marks with 255 the pixels to repaint.
        """
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

    def _batch_image_to_image(self, entries):
        from PIL import Image

        job = entries[0].job
        images = [Image.fromarray(e.inputs[0]) for e in entries for _ in range(e.images)]
        kwargs: dict[str, Any] = dict(
            **batch_text(entries),
            image=images,
            strength=job.strength,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            output_type="latent" if job.output_latents else "np",
            callback_on_step_end=self._step_callback(entries),
        )
        if entries[0].inputs[1] is None:
            output = self.img2img(**kwargs).images
        else:
            masks = [Image.fromarray(e.inputs[1]) for e in entries for _ in range(e.images)]
            kwargs.update(mask_image=masks, width=job.width, height=job.height)
            output = self.inpaint(**kwargs).images
        return split(finish(output, job.output_latents), entries)
