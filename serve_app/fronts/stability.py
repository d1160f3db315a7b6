"""Stability AI's gRPC generation API: ``gooseai.GenerationService/Generate``, as Stability's
own SDK (``stability_sdk.client.StabilityInference``) calls it for ``generate()`` and
``upscale()``. Served on Ray Serve's gRPC proxy by the ingress deployment (its ``Generate``
method, fronts/ingress.py); the messages are Stability's (fronts/gooseai/generation.proto).

A thin front like the HTTP ones: a ``Request`` becomes one
:class:`~serve_app.protocol.request.ImageRequest`, planned and run by the same images service,
with the same limits; each image goes back as one ``Answer`` holding one ``ARTIFACT_IMAGE``
artifact (``finish_reason`` ``FILTER`` when the safety checker flagged it). The images of a
call are one batch on the replica, so they are answered together when it ends. Every failure
is a gRPC status whose message names the request's field (:class:`StabilityError`).

How Stability's fields map:

- ``engine_id``: a served model name or alias; an upscaler makes it an upscale.
- ``prompt``: text prompts (weight 1, or -1 for the negative prompt), an ``ARTIFACT_IMAGE``
  artifact (init image: image-to-image, or the image to upscale) and an ``ARTIFACT_MASK``
  artifact (inpainting; black changes, white keeps).
- ``image.height``/``width`` (the output size; an upscale takes one of them or neither),
  ``samples`` (n), ``seed`` (one, used as seed + i, or one per sample; 0 or none: drawn),
  ``steps``, ``parameters[0].sampler.cfg_scale`` (guidance), ``parameters[0].schedule.start``
  (the init image's strength), ``transform.diffusion`` (the sampler: the engine's own only).

One module, over 400 lines: a front stands alone, and Stability's protocol has more fields
to convert and more statuses to map than the HTTP fronts.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Iterable

import grpc

from serve_app.config import AppConfig
from serve_app.fronts.gate import check_key, presented_key
from serve_app.fronts.gooseai import generation_pb2 as generation
from serve_app.service.encoding import EncodedImage
from serve_app.protocol.errors import APIError, ModelNotFoundError, error_from_exception
from serve_app.service.images import ImagesService
from serve_app.protocol.request import MAX_GUIDANCE, MAX_N, MAX_NAME_CHARS, MAX_SIDE, MAX_STEPS, MIN_SIDE, ImageRequest
from serve_app.service.uploads import BytesUpload, decode_keep_mask

logger = logging.getLogger("ray.serve")  # Serve's handler adds request id, deployment and replica

# Stability's samplers and the diffusers schedulers that are them; a request may name the
# sampler its engine runs (the real model's scheduler), no other.
SAMPLER_SCHEDULERS = {
    generation.SAMPLER_DDIM: "DDIMScheduler",
    generation.SAMPLER_DDPM: "DDPMScheduler",
    generation.SAMPLER_K_EULER: "EulerDiscreteScheduler",
    generation.SAMPLER_K_EULER_ANCESTRAL: "EulerAncestralDiscreteScheduler",
    generation.SAMPLER_K_HEUN: "HeunDiscreteScheduler",
    generation.SAMPLER_K_DPM_2: "KDPM2DiscreteScheduler",
    generation.SAMPLER_K_DPM_2_ANCESTRAL: "KDPM2AncestralDiscreteScheduler",
    generation.SAMPLER_K_LMS: "LMSDiscreteScheduler",
    generation.SAMPLER_K_DPMPP_2M: "DPMSolverMultistepScheduler",
    generation.SAMPLER_K_DPMPP_SDE: "DPMSolverSDEScheduler",
}

# Stability's upscale document: the x4 upscaler takes 20 steps unless told, at most 50,
# and a cfg_scale of 7; ESRGAN ignores prompt, seed, steps and cfg_scale.
UPSCALE_STEPS, UPSCALE_MAX_STEPS, UPSCALE_CFG_SCALE = 20, 50, 7.0
# Artifact.seed is a uint32: a sent seed's images (seed + i) must fit it. A seed the service
# draws always does (DRAWN_SEED_LIMIT).
SEED_LIMIT = 2**32
# Prompts a Request may hold: a text, a negative text, an init image and a mask.
MAX_PROMPTS = 4
# The end of the init image's schedule the pipelines run to (the SDK sends 0.01).
SCHEDULE_END_MAX = 0.01

# gRPC status of each HTTP status the images service answers with.
_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class StabilityError(Exception):
    """A gRPC status and the message the client sees (it names the field at fault)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)  # both in args: Ray pickles it to the proxy
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


def invalid(field: str, message: str) -> StabilityError:
    return StabilityError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")


def _name(enum, value: int) -> str:
    """An enum value's name, or its number when this server does not know it."""
    return enum.Name(value) if value in enum.values() else str(value)


@dataclass(frozen=True)
class Job:
    """A Request as the images service takes it: the ImageRequest, the init image and mask
    as sent, and the Request's field names for the planner's (``fields``) in messages."""

    engine: str
    request: ImageRequest
    image: bytes | None
    mask: bytes | None
    fields: dict[str, str]


def authenticate(metadata: Iterable[tuple[str, Any]], keys: tuple[bytes, ...]) -> str:
    """The caller (``protocol.keys.owner_of`` of its key). API keys on: the one ``authorization``
    metadata must be ``Bearer KEY`` (what the SDK's access-token credentials send, over TLS);
    two are refused whether keys are on or not, as HTTP refuses two headers."""
    from serve_app.protocol.keys import owner_of

    found = [value.encode() if isinstance(value, str) else value
             for key, value in metadata if key.lower() == "authorization"]
    if len(found) > 1:
        raise StabilityError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"authorization metadata: sent {len(found)} times; send it once")
    header = found[0] if found else b""
    if keys:
        error = check_key(header, keys)
        if error is not None:
            raise StabilityError(grpc.StatusCode.UNAUTHENTICATED,
                                 f"authorization metadata: {error.message}")
    return owner_of(presented_key(header))


def _unknown_field(message, path: str) -> str | None:
    """The first field of ``message`` (or of a message inside it) this server does not
    declare, as ``path.number``: a client asking for something it would silently not get."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    unknown = UnknownFieldSet(message)
    if len(unknown):
        return f"{path}{'.' if path else ''}{unknown[0].field_number}"
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.full_name.startswith("google.protobuf"):
            continue
        items = value if field.is_repeated else [value]
        for index, item in enumerate(items):
            where = f"{path}{'.' if path else ''}{field.name}"
            where += f"[{index}]" if field.is_repeated else ""
            found = _unknown_field(item, where)
            if found:
                return found
    return None


def _refuse_set(message, path: str, served: set[str]) -> None:
    """Refuse any field of ``message`` that is set but not in ``served``."""
    for field, _ in message.ListFields():
        if field.name not in served:
            raise invalid(f"{path}.{field.name}", "not served by this server")


def _prompts(request, max_bytes: int) -> tuple[str, str | None, tuple[str, bytes] | None,
                                               tuple[str, bytes] | None]:
    """(prompt, negative prompt, (field, init image), (field, mask)) of the Request."""
    positive: list[str] = []
    negative: list[str] = []
    image = mask = None
    total = 0
    for i, prompt in enumerate(request.prompt):
        where = f"prompt[{i}]"
        kind = prompt.WhichOneof("prompt")
        if kind == "text":
            weight = prompt.parameters.weight if prompt.parameters.HasField("weight") else 1.0
            if abs(weight) != 1.0:
                raise invalid(f"{where}.parameters.weight", f"{weight:g} is not served: 1 makes a "
                              "prompt, -1 a negative prompt (prompt weighting is not served)")
            (positive if weight > 0 else negative).append(prompt.text)
        elif kind == "artifact":
            artifact = prompt.artifact
            if prompt.HasField("parameters"):
                raise invalid(f"{where}.parameters", "weights apply to text prompts only")
            where += ".artifact"
            if artifact.type not in (generation.ARTIFACT_IMAGE, generation.ARTIFACT_MASK):
                raise invalid(f"{where}.type", f"{_name(generation.ArtifactType, artifact.type)} "
                              "is not served; send ARTIFACT_IMAGE (init image) or ARTIFACT_MASK")
            if artifact.WhichOneof("data") != "binary" or not artifact.binary:
                raise invalid(f"{where}.binary", "an image must come as the artifact's binary "
                              "(PNG, JPEG or WebP bytes)")
            total += len(artifact.binary)
            if total > max_bytes:  # as the HTTP body limit counts every upload of a request
                raise invalid(f"{where}.binary", f"the request's images come to {total} bytes, "
                              f"over the server's limit of {max_bytes} bytes")
            found = (where, artifact.binary)
            if artifact.type == generation.ARTIFACT_IMAGE:
                if image is not None:
                    raise invalid(where, f"a second init image ({image[0]} is the first)")
                image = found
            else:
                if mask is not None:
                    raise invalid(where, f"a second mask ({mask[0]} is the first)")
                mask = found
        else:  # token prompts were refused before (_check_counts)
            raise invalid(where, "an empty prompt: send text or an artifact")
    for texts, what in ((positive, "prompt"), (negative, "negative prompt")):
        if len(texts) > 1:
            raise invalid("prompt", f"{len(texts)} texts with the weight of a {what}; send one "
                          "(blending prompts is not served)")
    return (positive[0] if positive else ""), (negative[0] if negative else None), image, mask


def _step_parameters(params, has_image: bool, upscale: bool) -> tuple[float | None, float | None]:
    """(cfg_scale, schedule start) of ``image.parameters`` (one block at most:
    :func:`_check_counts` refused more)."""
    if not params.parameters:
        return None, None
    step, where = params.parameters[0], "image.parameters[0]"
    if step.scaled_step != 0:
        raise invalid(f"{where}.scaled_step", "one block of parameters for every step is served: "
                      "send 0")
    if step.HasField("guidance") and step.guidance.guidance_preset != generation.GUIDANCE_PRESET_NONE:
        raise invalid(f"{where}.guidance", "CLIP guidance is not served; leave it unset")
    cfg_scale = start = None
    if step.HasField("sampler"):
        _refuse_set(step.sampler, f"{where}.sampler", {"cfg_scale"})
        if step.sampler.HasField("cfg_scale"):
            cfg_scale = step.sampler.cfg_scale
            if not 0.0 <= cfg_scale <= MAX_GUIDANCE:  # NaN fails both
                raise invalid(f"{where}.sampler.cfg_scale", f"{cfg_scale:g}: must be 0 to "
                              f"{MAX_GUIDANCE:g}")
    if step.HasField("schedule"):
        schedule = step.schedule
        if not has_image or upscale:
            raise invalid(f"{where}.schedule", "applies to an init image to change, and "
                          + ("an upscale changes none" if upscale else "none was sent"))
        _refuse_set(schedule, f"{where}.schedule", {"start", "end"})
        if schedule.HasField("end") and not 0.0 <= schedule.end <= SCHEDULE_END_MAX:
            raise invalid(f"{where}.schedule.end", f"{schedule.end:g}: the pipelines denoise to "
                          f"the end; send 0 to {SCHEDULE_END_MAX}")
        if schedule.HasField("start"):
            start = schedule.start
            if not 0.0 < start <= 1.0:
                raise invalid(f"{where}.schedule.start", f"{start:g}: must be above 0 and at most 1")
    return cfg_scale, start


def _check_sampler(params, served, upscale: bool) -> None:
    if not params.HasField("transform"):
        return
    kind = params.transform.WhichOneof("type")
    if kind == "upscaler":
        if not upscale:
            raise invalid("image.transform.upscaler", "applies to an upscale engine")
        return
    if kind != "diffusion":
        return
    sampler = params.transform.diffusion
    name = _name(generation.DiffusionSampler, sampler)
    runs = served.info.scheduler
    if runs is None or SAMPLER_SCHEDULERS.get(sampler) != runs:
        ours = [generation.DiffusionSampler.Name(s) for s, c in SAMPLER_SCHEDULERS.items() if c == runs]
        raise invalid("image.transform.diffusion", f"{name} is not served by {served.name}, "
                      f"which runs {runs or 'no sampler'}"
                      + (f" ({ours[0]}); send that or leave it unset" if ours else ""))


def _seeds(params, samples: int) -> list[int] | None:
    """One seed (samples use seed + i), one per sample, or None: the images service draws
    it, as for every front."""
    seeds = list(params.seed)
    if not seeds or not any(seeds):
        return None
    if len(seeds) not in (1, samples):
        raise invalid("image.seed", f"{len(seeds)} seeds for {samples} samples; send one, or "
                      "one per sample")
    if len(seeds) == 1 and seeds[0] + samples > SEED_LIMIT:
        raise invalid("image.seed", f"{seeds[0]} + {samples} samples runs past {SEED_LIMIT - 1}")
    return seeds


def _check_counts(request) -> None:
    """Every repeated field and every name of a Request within its bound, before anything
    walks them (a message of the proxy's limit can hold millions of entries)."""
    if len(request.prompt) > MAX_PROMPTS:
        raise invalid("prompt", f"{len(request.prompt)} prompts; send at most {MAX_PROMPTS}: a "
                      "text, a negative text (weight -1), an init image and a mask")
    for i, prompt in enumerate(request.prompt):
        if prompt.WhichOneof("prompt") == "tokens":
            raise invalid(f"prompt[{i}].tokens", "token prompts are not served; send text")
    for field, value in (("engine_id", request.engine_id), ("request_id", request.request_id)):
        if len(value) > MAX_NAME_CHARS:
            raise invalid(field, f"{len(value)} characters; the most is {MAX_NAME_CHARS}")
    params = request.image
    if len(params.seed) > MAX_N:
        raise invalid("image.seed", f"{len(params.seed)} seeds; send one, or one per sample "
                      f"(at most {MAX_N})")
    if len(params.parameters) > 1:
        raise invalid("image.parameters", f"{len(params.parameters)} step parameter blocks; "
                      "one is served")


def to_job(request, config: AppConfig) -> Job:
    """Check a Request and convert it: every field it sets is served or refused here, so
    nothing a client asks for is silently dropped."""
    _check_counts(request)
    unknown = _unknown_field(request, "")
    if unknown:
        raise invalid(unknown, "this field is not served by this server")
    if request.requested_type not in (generation.ARTIFACT_NONE, generation.ARTIFACT_IMAGE):
        raise invalid("requested_type", f"{_name(generation.ArtifactType, request.requested_type)} "
                      "is not served; this server answers images")
    if request.HasField("extras") and request.extras.fields:
        raise invalid("extras", f"{', '.join(sorted(request.extras.fields))} not served "
                      "(style presets and other extras)")
    engine = request.engine_id
    if not engine:
        raise invalid("engine_id", "empty; name an engine (a served model or alias)")
    entry = config.resolve(engine)
    if entry is None:
        raise StabilityError(grpc.StatusCode.NOT_FOUND, f"engine_id: the engine '{engine}' "
                             f"does not exist. Available engines: {', '.join(config.served_names())}.")
    served = config.prompted_model(entry)
    upscale = "upscale" in entry.capabilities
    params = request.image
    text, negative, image, mask = _prompts(request, config.ingress.max_upload_bytes)
    if params.adapter.adapter_type != generation.T2IADAPTER_NONE:
        raise invalid("image.adapter.adapter_type", "T2I adapters are not served; send "
                      "T2IADAPTER_NONE")
    if params.HasField("weight_method") and params.weight_method != generation.TEXT_ENCODER:
        raise invalid("image.weight_method", "only TEXT_ENCODER is served")
    if params.HasField("quantize") and not params.quantize:
        raise invalid("image.quantize", "images are returned quantized (8-bit PNG) only")
    _check_sampler(params, served, upscale)
    cfg_scale, start = _step_parameters(params, image is not None, upscale)
    if params.HasField("masked_area_init") and params.masked_area_init != generation.MASKED_AREA_INIT_ORIGINAL \
            and start is not None and start < 1.0:
        # Below 1 the masked area starts from the init image, noised by start_schedule; at 1
        # (the SDK's default) from noise alone, which ZERO and RANDOM ask for.
        raise invalid("image.masked_area_init", f"{_name(generation.MaskedAreaInit, params.masked_area_init)} "
                      "with start_schedule below 1: the masked area starts from the init image, "
                      "noised (MASKED_AREA_INIT_ORIGINAL); send start_schedule 1 for noise alone")
    samples = params.samples if params.HasField("samples") else 1
    if not 1 <= samples <= MAX_N:
        raise invalid("image.samples", f"{samples}: must be 1 to {MAX_N}")
    steps = params.steps if params.HasField("steps") else None
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise invalid("image.steps", f"{steps}: must be 1 to {MAX_STEPS} (and at most the "
                      "engine's own limit)")
    width = params.width if params.HasField("width") else None
    height = params.height if params.HasField("height") else None
    for side, value in (("width", width), ("height", height)):
        if value is not None and not MIN_SIDE <= value <= MAX_SIDE:
            raise invalid(f"image.{side}", f"{value}: must be {MIN_SIDE} to {MAX_SIDE} pixels")
    seeds = _seeds(params, samples)
    fields = {"model": "engine_id", "n": "image.samples", "seed": "image.seed",
              "num_inference_steps": "image.steps", "prompt": "prompt",
              "negative_prompt": "prompt", "guidance_scale": "image.parameters[0].sampler.cfg_scale",
              "strength": "image.parameters[0].schedule.start",
              "image": image[0] if image else "prompt", "mask": mask[0] if mask else "prompt"}
    if upscale:
        if image is None:
            raise invalid("prompt", "an upscale needs the image, as a prompt artifact of type "
                          "ARTIFACT_IMAGE")
        if mask is not None:
            raise invalid(mask[0], "an upscale takes no mask")
        if width is not None and height is not None:
            raise invalid("image.width", "send image.width or image.height, never both: the "
                          "other side keeps the image's aspect ratio")
        diffusion = served.info.diffusion
        if diffusion:
            steps = UPSCALE_STEPS if steps is None else steps
            if steps > UPSCALE_MAX_STEPS:
                raise invalid("image.steps", f"{steps}: the upscaler takes at most {UPSCALE_MAX_STEPS}")
        fields.update(upscale="image.width" if width is not None else "image.height",
                      width="image.width", height="image.height")
        base = ImageRequest(
            task="upscale", model=engine, n=samples, width=width, height=height,
            prompt=text if diffusion else "", negative_prompt=negative if diffusion else None,
            num_inference_steps=steps if diffusion else None,
            guidance_scale=(UPSCALE_CFG_SCALE if cfg_scale is None else cfg_scale) if diffusion else None,
        )
    else:
        if (width is None) != (height is None):
            raise invalid("image.width" if width is None else "image.height",
                          "send image.width and image.height together, or neither for the "
                          "engine's default size")
        if mask is not None and image is None:
            raise invalid(mask[0], "a mask needs an init image (a prompt artifact of type "
                          "ARTIFACT_IMAGE)")
        if not text.strip():
            raise invalid("prompt", "a text prompt (weight 1) is needed, and it must not be blank")
        fields.update(size="image.width", width="image.width", height="image.height")
        base = ImageRequest(
            task="edit" if image is not None else "generate", model=engine, n=samples,
            prompt=text, negative_prompt=negative, num_inference_steps=steps,
            guidance_scale=cfg_scale, strength=(1.0 if start is None else start) if image else None,
            size=f"{width}x{height}" if width is not None else None,
        )
    # One seed: sample i uses seed + i; else each sample its own; none: drawn by the service.
    if seeds is None:
        request_ = base
    elif len(seeds) == 1:
        request_ = replace(base, seed=seeds[0])
    else:
        request_ = replace(base, seeds=tuple(seeds))
    return Job(engine, request_, image[1] if image else None, mask[1] if mask else None, fields)


def status_of(error: APIError, fields: dict[str, str]) -> StabilityError:
    """The gRPC status of an images-service error, its field named as the Request names it."""
    code = _STATUS.get(error.status_code, grpc.StatusCode.INTERNAL)
    if isinstance(error, ModelNotFoundError):
        return StabilityError(code, f"engine_id: {error.message}")
    field = fields.get(error.param or "", error.param)
    return StabilityError(code, f"{field}: {error.message}" if field else error.message)


def answer(request_id: str, engine: str, index: int, image: EncodedImage, received_ms: int):
    """One image as Stability sends it: an Answer with one ARTIFACT_IMAGE artifact."""
    artifact = generation.Artifact(
        id=index, type=generation.ARTIFACT_IMAGE, mime="image/png", binary=image.blob,
        index=index, seed=image.seed, uuid=str(uuid.uuid4()), size=len(image.blob),
        finish_reason=generation.FILTER if image.nsfw else generation.NULL,
    )
    return generation.Answer(
        answer_id=str(uuid.uuid4()), request_id=request_id, received=received_ms,
        created=int(time.time() * 1000), meta=generation.AnswerMeta(engine_id=engine),
        artifacts=[artifact],
    )


async def generate(service: ImagesService, keys: tuple[bytes, ...], request,
                   metadata: Iterable[tuple[str, Any]]) -> AsyncIterator[Any]:
    """Answer one ``Generate`` call: the request checked and planned before any model work,
    run, then one Answer per image. Raises :class:`StabilityError`; a caller that goes away
    cancels the run (the cancellation reaches the await on the model's handle)."""
    received_ms = int(time.time() * 1000)
    fields: dict[str, str] = {}
    try:
        owner = authenticate(metadata, keys)
        job = to_job(request, service.config)
        fields = job.fields
        plan = await service.plan(replace(job.request, owner=owner), BytesUpload(job.image) if job.image else None,
                                  BytesUpload(job.mask) if job.mask else None, decode_keep_mask)
        images, _ = await service.images(plan)
    except StabilityError:
        raise
    except Exception as exc:  # noqa: BLE001 - a status for the client, the traceback in the log
        error = error_from_exception(exc, service.config.ingress.retry_after_s)
        raise status_of(error, fields) from None
    logger.info("gRPC Generate engine=%s images=%d seeds=%s", job.engine, len(images),
                [image.seed for image in images])
    for index, image in enumerate(images):
        yield answer(request.request_id, job.engine, index, image, received_ms)
