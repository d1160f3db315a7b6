"""The contract between the ingress and the model deployments: jobs, results, methods.

The ingress builds jobs and hands each stage's result to the next stage; a model replica
runs jobs and returns :class:`StageResult`. Both sides import this module and nothing else
of each other. A stage is called as ``handle.run.remote(job, *inputs)`` (or
``handle.options(stream=True).stream.remote(job, *inputs, partial_images=n)``): the
replica picks the method from the job's type (:data:`JOB_METHODS`), so no method name
travels as a string.

Plain dataclasses without torch, so that the ingress can build them without importing any
model code. Images travel as uint8 numpy arrays (N, H, W, 3) or (H, W, 3); latents (from a
stage with ``output_latents``) as CPU tensors (N, 4, h, w) that the ingress never touches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from deployments.sources import Source


# Step mode's default images in flight, per image of a UNet call (max_batch_images): a job
# waiting between two of its steps holds its latents and conditioning only (about 1 MB an
# SDXL image in float16). A new job starts at once only while there is room; how the
# first-step wait depends on this ratio is modelled by `python3 benchmarks/steps_model.py`
# (benchmarks/results/steps-model.md; docs/benchmarks.md reads it).
IN_FLIGHT_PER_BATCH = 16

# The largest Hub LoRA file a request may name, by default (ModelConfig.max_hub_lora_bytes):
# SD 2.1 and SDXL LoRAs are mostly 10-250 MB and the largest (rank 128 on SDXL) near 900 MB,
# so 1 GiB takes every real one, while a full checkpoint named as a LoRA (2-7 GB) is refused.
MAX_HUB_LORA_BYTES = 2**30


def images_in_flight(max_batch_images: int, max_images_in_flight: int | None) -> int:
    """Step mode: the images a replica keeps in flight (the config's, else the default)."""
    return max_images_in_flight or IN_FLIGHT_PER_BATCH * max_batch_images


@dataclass(frozen=True)
class PipelineSpec:
    """How a deployment loads its pipeline."""

    name: str
    family: str
    source: Source
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float16"
    cpu_dtype: str = "float32"
    cpu_offload: bool = False
    compile: bool = False
    cpu_threads: int | None = None
    max_batch_images: int = 8
    batch_wait_timeout_s: float = 0.0
    batching_mode: str = "request"  # "step": jobs join and leave at every step (steploop.py)
    max_shape_wait_s: float = 2.0  # step mode: the longest a job waits behind another shape
    # Step mode: images a replica keeps in flight (each UNet call takes at most
    # max_batch_images of them); None: IN_FLIGHT_PER_BATCH x max_batch_images.
    max_images_in_flight: int | None = None
    preview_decoder: Source | None = None  # a tiny autoencoder for stream previews
    vae: Source | None = None  # a replacement VAE (same latent space)
    vae_tiling: bool = False
    vae_slicing: bool = False
    max_loaded_loras: int = 8  # LoRA adapters kept loaded; the least recently used leave
    fused_loras: tuple = ()  # LoraRefs merged into the weights at load (no per-step cost)
    # LoraRefs of the adapters the config names (requests may ask for them): a failure to
    # load one is the server's; the replica loads the first at start to prove its LoRA stack.
    loras: tuple = ()
    hub_loras: bool = False  # requests may name Hub LoRAs (the start probes the stack then too)
    max_hub_lora_bytes: int = MAX_HUB_LORA_BYTES  # the largest LoRA file a request may name
    # LoRA slots of the UNet (deployments/runtime/lora_slots.py): how many adapters one
    # batch may use at once, and their rank (None: the configured adapters' highest).
    lora_slots: int = 3
    lora_rank: int | None = None

    @property
    def images_in_flight(self) -> int:
        """Step mode: the images a replica keeps in flight."""
        return images_in_flight(self.max_batch_images, self.max_images_in_flight)

    def __post_init__(self):
        # Sources arrive parsed from the config; a spec written by hand (tests, benchmarks)
        # may name them as text, parsed here by the one parser.
        for key in ("source", "preview_decoder", "vae"):
            value = getattr(self, key)
            if isinstance(value, str):
                object.__setattr__(self, key, Source.parse(value))


@dataclass(frozen=True)
class LoraRef:
    """One LoRA adapter a job runs with: ``name`` is its adapter name in the pipeline (the
    configured name, or the Hub id of a client-named one), ``source`` where its weights are
    (:class:`~deployments.sources.Source`: a Hub id, a local folder, a stand-in such as
    ``KIND:lora/<family>/<name>``); ``weight_name`` the file in it (None: the diffusers
    default); ``weight`` its scale (0 leaves the model as it is)."""

    name: str
    source: Source
    weight_name: str | None
    weight: float

    def __post_init__(self):
        if isinstance(self.source, str):
            object.__setattr__(self, "source", Source.parse(self.source))


@dataclass(frozen=True)
class _DenoisingJob:
    """What text-to-image and image-to-image jobs share: prompts, output size, schedule."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float


@dataclass(frozen=True)
class TextToImageJob(_DenoisingJob):
    """Generate ``len(seeds)`` images of one prompt; image i starts from ``seeds[i]``.

    ``denoising_end`` stops early (the first half of a base -> refiner chain);
    ``output_latents`` returns latents instead of decoded images.
    """

    seeds: tuple[int, ...]
    denoising_end: float | None = None
    output_latents: bool = False
    # SDXL's second text encoder (OpenCLIP bigG) reads these; None: the prompts above.
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    # LoRA adapters to apply (names unique); empty: the model as loaded.
    loras: tuple[LoraRef, ...] = ()


@dataclass(frozen=True)
class ImageToImageJob(_DenoisingJob):
    """Edit one input image ``len(seeds)`` times (the image and an optional mask are
    passed beside the job, already at ``width`` x ``height``)."""

    strength: float
    seeds: tuple[int, ...]
    output_latents: bool = False
    loras: tuple[LoraRef, ...] = ()


@dataclass(frozen=True)
class RefineJob:
    """Finish denoising latents from ``denoising_start`` on and decode them to images."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    denoising_start: float
    output_latents: bool = False


@dataclass(frozen=True)
class UpscaleJob:
    """Upscale one image (repeated ``len(seeds)`` times) or a batch of ``len(seeds)``
    images or latents by the model's factor. Diffusion upscalers use the prompt, steps,
    guidance and seeds; ESRGAN ignores them."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    noise_level: int | None = None


@dataclass(frozen=True)
class SafetyJob:
    """Check a stage's images with the safety checker; ``blur`` blurs the flagged ones."""

    blur: bool = False


@dataclass(frozen=True)
class StageResult:
    """What a model replica returns: its output and what producing it cost.

    ``steps`` are denoising steps summed over the job's images; ``seconds`` is the job's
    share (by image count) of its batch's pipeline time. A chained stage receives its
    predecessor's StageResult, works on ``output`` and adds its own cost, so the last stage
    returns the cost of the whole chain. ``seeds`` are the seeds the replica made the images
    with, one per image (the job's): the response labels its images with these.
    """

    output: Any
    steps: int = 0
    seconds: float = 0.0
    nsfw: tuple[bool, ...] | None = None  # the safety checker's flags, one per image
    # When ``output`` is latents: the latent space they live in (deployments/families.py).
    latent_space: str | None = None
    # One per image; a stage that draws no noise (the safety checker) passes on its input's.
    seeds: tuple[int, ...] = ()

    def plus(self, earlier: "StageResult | None") -> "StageResult":
        """This stage's result with the earlier stages' cost added (and their seeds, where
        this stage has none of its own)."""
        if earlier is None:
            return self
        return dataclasses.replace(self, steps=self.steps + earlier.steps,
                                   seconds=self.seconds + earlier.seconds,
                                   seeds=self.seeds or earlier.seeds)


def unwrap(value: Any) -> tuple[Any, StageResult | None]:
    """(output, cost so far) of a stage input that may be a previous stage's result."""
    if isinstance(value, StageResult):
        return value.output, value
    return value, None


@dataclass(frozen=True)
class Upstream:
    """A previous stage's result handed over by reference (a Ray ``ObjectRef``): the
    replica fetches it itself (:func:`resolve_inputs`), straight from the replica that made
    it, never through the ingress.

    Not the ``DeploymentResponse`` itself: Serve would resolve that before the call, and
    when the previous stage's node is lost, its result is an ``ActorUnavailableError`` that
    Serve's router takes for the next replica's own, retrying the call until the request
    times out (docs/architecture.md, "A request's way", says what Ray has fixed of it).
    Fetched here, a lost input ends the request at once
    (:class:`~deployments.errors.UpstreamLost`).
    """

    ref: Any


async def resolve_inputs(inputs: tuple) -> tuple:
    """``inputs`` with every :class:`Upstream` fetched; raises ``UpstreamLost`` when the
    replica that made one failed (its error otherwise travels on unchanged)."""
    if not any(isinstance(item, Upstream) for item in inputs):
        return inputs
    from ray.exceptions import ActorUnavailableError, RayActorError

    from deployments.errors import UpstreamLost

    resolved = []
    for item in inputs:
        if isinstance(item, Upstream):
            try:
                item = await item.ref
            except (RayActorError, ActorUnavailableError) as exc:
                raise UpstreamLost(type(exc).__name__) from None
        resolved.append(item)
    return tuple(resolved)


# The job types a model deployment runs, and the method of the deployment class that runs
# each (a deployment runs the job types whose method it has).
JOB_METHODS: dict[type, str] = {
    TextToImageJob: "text_to_image",
    ImageToImageJob: "image_to_image",
    RefineJob: "refine",
    UpscaleJob: "upscale",
    SafetyJob: "check",
}

# Jobs whose denoising can stream previews.
STREAMING_JOBS = (TextToImageJob, ImageToImageJob)


class ModelDeployment(Protocol):
    """What the ingress calls on every model deployment's handle."""

    async def run(self, job: Any, *inputs: Any) -> StageResult:
        """Run ``job`` on ``inputs`` (decoded uploads, or the previous stage's result)."""

    def stream(self, job: Any, *inputs: Any, partial_images: int = 0) -> AsyncIterator[tuple]:
        """Run a streaming job: ``("partial", index, pixels)`` previews, then
        ``("final", StageResult)``."""
