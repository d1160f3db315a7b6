"""The asynchronous jobs API (our extension, OpenAI-style objects): submit a job, poll it,
cancel it. The input is validated and planned exactly as the synchronous route does it, so a
bad request is a 400 at submit and never a failed job; the job runs on the task consumer."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from dataclasses import asdict, replace
from typing import Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile as StarletteUpload

from serve_app.fronts.wire import ImageEditForm, ImageGenerationRequest, ImageVariationForm, UpscaleForm
from serve_app.fronts.openapi import request_body, responses
from serve_app.fronts.shared import Service, base_url, check_one_image, count_images, guarded, request_owner
from serve_app.service.store import INPUT
from serve_app.service.uploads import BytesUpload
from serve_app.protocol.errors import APIError, InvalidRequestError, NotFoundError
from serve_app.protocol.request import MAX_NAME_CHARS
from serve_app.protocol.responses import ErrorDetail, ImagesResponse

# Longest webhook URL.
MAX_WEBHOOK_CHARS = 2048

router = APIRouter()
logger = logging.getLogger("ray.serve")


class ConflictError(APIError):
    status_code = 409
    error_type = "invalid_request_error"


class JobSubmission(BaseModel):
    """Body of ``POST /v1/images/jobs`` as JSON: a generations job."""

    model_config = ConfigDict(extra="forbid")

    operation: Literal["generations"] = Field(description="The synchronous route the job runs.")
    input: ImageGenerationRequest = Field(description="That route's body.")
    webhook: str | None = Field(default=None, max_length=MAX_WEBHOOK_CHARS,
                                description="Posted to when the job ends.")
    priority: Literal["high", "normal", "low"] = "normal"


class JobObject(BaseModel):
    """The job object every jobs route answers (serve_app/jobs/store.py: ``JobRecord.public``)."""

    id: str
    object: Literal["image.job"]
    operation: Literal["generations", "edits", "variations", "upscale"]
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    priority: Literal["high", "normal", "low"]
    created: int = Field(description="Unix time of the submission.")
    started: int | None = Field(description="Unix time its (latest) run began; null while queued.")
    finished: int | None = Field(description="Unix time it ended; null until then.")
    result: ImagesResponse | None = Field(
        description="Once it succeeded: what the synchronous route answers, its images as "
        "`url` (a job takes no other response_format).")
    error: ErrorDetail | None = Field(description="Once it failed: why, as an error envelope's `error`.")


_OFF = "The jobs API is off on this server (no `jobs:` section in its config)"
_NO_JOB = {404: f"No job with this id made with this API key, or: {_OFF.lower()}."}
_ENDED = {409: "The job has already ended (succeeded, failed or canceled)."}


# Multipart jobs: the form of the synchronous route, plus operation, webhook and priority.
FORMS = {"edits": ImageEditForm, "variations": ImageVariationForm, "upscale": UpscaleForm}
PRIORITY_NAMES = ("high", "normal", "low")


def _job_form() -> dict[str, Any]:
    """The multipart body's schema: ``operation``, ``webhook`` and ``priority``, and the
    fields of that operation's route (an edit's shown: variations and upscales take their own
    routes' fields, as the description says)."""
    form = ImageEditForm.model_json_schema()
    fields = JobSubmission.model_json_schema()["properties"]
    properties = {
        "operation": {"type": "string", "enum": list(FORMS),
                      "description": "The synchronous route the job runs, with that route's fields."},
        "webhook": {"type": "string", "maxLength": MAX_WEBHOOK_CHARS,
                    "description": fields["webhook"]["description"]},
        "priority": {"type": "string", "enum": list(PRIORITY_NAMES), "default": "normal"},
        **form["properties"],
    }
    return {"type": "object", "properties": properties,
            "required": ["operation", *form.get("required", [])]}


def _jobs(request: Request):
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise NotFoundError("The jobs API is off on this server (no jobs: section in its config).")
    return jobs


def _validated(model, data):
    try:
        return model.model_validate(data)
    except ValidationError as exc:  # the app's handler answers it as the route would: a 400
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


async def _submission(request: Request):
    """(operation, wire model, uploads, webhook, priority, a hash of what was sent)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        check_one_image(count_images(form))
        fields: dict[str, Any] = {}
        uploads: dict[str, BytesUpload] = {}
        digest = hashlib.sha256()
        for key, value in sorted(form.multi_items(), key=lambda kv: kv[0]):
            key = "image" if key == "image[]" else key  # a list of one, as the openai client sends it
            if isinstance(value, StarletteUpload):
                data = await value.read()
                uploads[key] = BytesUpload(data, value.content_type or "application/octet-stream")
                digest.update(key.encode() + hashlib.sha256(data).digest())
                fields[key] = value
            else:
                fields[key] = value
                digest.update(f"{key}={value}".encode())
        operation = fields.pop("operation", None)
        webhook, priority = fields.pop("webhook", None), fields.pop("priority", "normal")
        if operation not in FORMS:
            raise InvalidRequestError(
                f"operation must be one of {', '.join(FORMS)} for a multipart job "
                "(generations: a JSON body)", param="operation")
        if webhook is not None and len(webhook) > MAX_WEBHOOK_CHARS:
            raise InvalidRequestError(f"webhook is {len(webhook)} characters; the most is "
                                      f"{MAX_WEBHOOK_CHARS}", param="webhook")
        if priority not in PRIORITY_NAMES:
            raise InvalidRequestError(f"priority must be one of {', '.join(PRIORITY_NAMES)}",
                                      param="priority")
        for upload in [v for v in fields.values() if isinstance(v, StarletteUpload)]:
            await upload.seek(0)
        wire = _validated(FORMS[operation], fields)
        return operation, wire, uploads, webhook, priority, digest.hexdigest()
    raw = await request.body()
    try:
        body = JobSubmission.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    return body.operation, body.input, {}, body.webhook, body.priority, hashlib.sha256(raw).hexdigest()


@router.post("/v1/images/jobs", status_code=202, response_model=JobObject, responses=responses(
    400, 404, 409, 413, 429, 503, about={
        404: f"No served model by this name or alias (`model`), or: {_OFF.lower()}.",
        409: "This `Idempotency-Key` was used with another body."}),
    openapi_extra=request_body(JobSubmission, _job_form(), (
        "A generations job as JSON (`input`: the body of POST /v1/images/generations), or an "
        "edits, variations or upscale job as multipart: `operation`, `webhook`, `priority` and "
        "the fields of that route's form (an edit's are shown).")))
async def submit_job(request: Request, service: Service,
                     idempotency_key: str | None = Header(default=None, max_length=MAX_NAME_CHARS)
                     ) -> JSONResponse:
    """Submit a job: a JSON generations body, or multipart with ``operation`` (edits,
    variations, upscale) and that route's fields. 202 with the job object."""
    from serve_app.jobs.store import new_job_id

    jobs, owner = _jobs(request), request_owner(request)
    operation, wire, uploads, webhook, priority, body_hash = await _submission(request)
    if "response_format" not in wire.model_fields_set:
        wire = wire.model_copy(update={"response_format": "url"})
    image_request = dataclasses.replace(wire.to_request(), owner=owner)
    if image_request.response_format != "url":
        # A job's record is kept for jobs.result_ttl_s in the jobs' state store: base64 images
        # (megabytes each) would fill it; the images are kept in the image store instead.
        raise InvalidRequestError(
            f"response_format: a job answers its images by url (GET /v1/images/files/...), "
            f"not {image_request.response_format}; leave response_format out or set it to url, "
            "or use the synchronous route for b64_json", param="response_format")
    if image_request.stream:
        raise InvalidRequestError("stream: a job is not streamed; poll it, or use the synchronous "
                                  "route to stream", param="stream")
    # Planned now exactly as the synchronous route plans it: a bad request is a 400 here.
    await guarded(service.plan(image_request, uploads.get("image"), uploads.get("mask")),
                  service.config.ingress.retry_after_s)
    if webhook is not None:
        if not jobs.webhooks.secret_for(owner):
            raise InvalidRequestError("webhook: this server sends no webhooks (its config has no "
                                      "jobs.webhooks.secret, nor a key secret for this API key); "
                                      "poll the job instead", param="webhook")
        try:
            jobs.webhooks.policy.check(webhook)
        except ValueError as exc:
            raise InvalidRequestError(f"webhook: {exc}", param="webhook") from None
    job_id = new_job_id()
    if idempotency_key:
        earlier = await _claim_idempotency(jobs, owner, idempotency_key, body_hash, job_id)
        if earlier is not None:
            return JSONResponse(earlier.public(), status_code=202)

    async def create():
        try:
            return await _create(request, service, jobs, job_id, operation, owner, image_request,
                                 uploads, webhook, priority)
        except BaseException:
            if idempotency_key:  # no job came of it: a retry with this key makes one
                await asyncio.to_thread(jobs.store.release_idempotency, owner, idempotency_key,
                                        job_id)
            raise

    # Shielded: a client that hangs up mid-submit leaves a job made whole (its key kept) or
    # nothing, never a record without its message or a key given back over a job.
    record = await asyncio.shield(asyncio.ensure_future(create()))
    return JSONResponse(record.public(), status_code=202)


# How long a submit waits for the job of a concurrent submit with the same Idempotency-Key.
IDEMPOTENT_WAIT_S = 10.0


async def _claim_idempotency(jobs, owner: str, key: str, body_hash: str, job_id: str):
    """None once ``key`` names ``job_id`` (created if absent, in one step, so of concurrent
    submits one makes the job); else the job an earlier submit with this key made, waited
    for while that submit is still writing it. 409 for another body, or a submit still
    under way after IDEMPOTENT_WAIT_S."""
    deadline = time.monotonic() + IDEMPOTENT_WAIT_S
    while True:
        earlier = await asyncio.to_thread(jobs.store.claim_idempotency, owner, key, body_hash, job_id)
        if earlier is None:
            return None
        if earlier == "":
            raise ConflictError("Idempotency-Key was used with another body.", param="Idempotency-Key")
        record = await asyncio.to_thread(jobs.store.get, earlier)
        if record is not None:
            return record
        if time.monotonic() > deadline:
            raise ConflictError("A submit with this Idempotency-Key is still under way; retry "
                                "it shortly.", param="Idempotency-Key")
        await asyncio.sleep(0.1)


class BrokerUnavailableError(APIError):
    """503: the job could not be sent to the broker; nothing was kept, so a retry is safe."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, retry_after_s: int):
        super().__init__("The job could not be queued (the jobs broker did not take it); "
                         "nothing was kept: submit it again.", code="broker_unavailable")
        self.headers["Retry-After"] = str(retry_after_s)


async def _create(request: Request, service, jobs, job_id: str, operation: str, owner: str,
                  image_request, uploads: dict, webhook: str | None, priority: str):
    """Store the uploads, write the record, send the job to the broker."""
    from serve_app.jobs.store import JobRecord

    # To the image store, not into the broker message: its pool of job uploads, which URL
    # images never evict; the uploads are deleted when the job ends.
    names = list(uploads)
    ids = await guarded(service.store.put_many(
        [(uploads[name].data, uploads[name].content_type) for name in names], owner, INPUT),
        service.config.ingress.retry_after_s) if names else []
    data: dict[str, Any] = asdict(image_request)
    data["_base_url"] = base_url(request)
    record = JobRecord(id=job_id, operation=operation, owner=owner, request=data,
                       priority=priority, webhook=webhook, inputs=dict(zip(names, ids)))
    # The record before the message (a consumer that took the message first would find no
    # job and drop it); the queued mark lets a consumer's sweep send the message again if
    # this replica dies in between (runner.redispatch_queued).
    await asyncio.to_thread(jobs.store.put, record)
    await asyncio.to_thread(jobs.store.mark_queued, record.id)
    try:
        await asyncio.to_thread(jobs.enqueue, record)
    except Exception:  # noqa: BLE001 - the broker's error, logged; the client retries
        logger.exception("job %s: sending it to the broker failed; its record is removed", job_id)
        await asyncio.to_thread(jobs.store.delete, record.id)
        await asyncio.to_thread(jobs.store.unmark_queued, record.id)
        if ids:
            try:
                await service.store.delete(ids)
            except Exception:  # noqa: BLE001 - they expire with their TTL instead
                logger.warning("job %s: deleting its uploads failed", job_id, exc_info=True)
        raise BrokerUnavailableError(service.config.ingress.retry_after_s) from None
    return record


async def _owned(request: Request, job_id: str):
    jobs = _jobs(request)
    record = await asyncio.to_thread(jobs.store.get, job_id)
    if record is None or record.owner != request_owner(request):  # another key's job: as unknown
        raise NotFoundError(f"No job with id '{job_id}'.", param="id")
    return jobs, record


@router.get("/v1/images/jobs/{job_id}", response_model=JobObject, responses=responses(404, about=_NO_JOB))
async def get_job(request: Request, job_id: str) -> JSONResponse:
    """A job's state, and its result once it succeeded."""
    _, record = await _owned(request, job_id)
    return JSONResponse(record.public())


@router.post("/v1/images/jobs/{job_id}/cancel", response_model=JobObject,
             responses=responses(404, 409, about=_NO_JOB | _ENDED))
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    """Cancel: a queued job never runs, a running one stops at its next step; 409 once ended."""
    from serve_app.jobs.store import FINAL

    jobs, record = await _owned(request, job_id)
    if record.status in FINAL:
        raise ConflictError(f"The job has already {record.status}.", param="id")
    await asyncio.to_thread(jobs.store.request_cancel, job_id)
    if record.status == "queued":  # it never runs: the consumer finds the flag first
        canceled = replace(record, status="canceled", finished=int(time.time()))
        # Over the queued record only: if a consumer started it meanwhile, the flag stops it.
        if await asyncio.to_thread(jobs.store.replace, canceled, record):
            record = canceled
        else:
            record = await asyncio.to_thread(jobs.store.get, job_id) or record
    return JSONResponse(record.public())
