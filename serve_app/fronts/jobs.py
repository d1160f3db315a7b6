"""The asynchronous jobs API (our extension, OpenAI-style objects): submit a job, poll it,
cancel it. The input is validated and planned exactly as the synchronous route does it, so a
bad request is a 400 at submit and never a failed job; the job runs on the task consumer."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import asdict, replace
from typing import Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serve_app.fronts.openai import ImageGenerationRequest
from serve_app.fronts.routing import Service, base_url, guarded
from serve_app.service.errors import APIError, InvalidRequestError, NotFoundError

router = APIRouter()


class ConflictError(APIError):
    status_code = 409
    error_type = "invalid_request_error"


class JobSubmission(BaseModel):
    """Body of ``POST /v1/images/jobs`` (JSON: generations)."""

    model_config = ConfigDict(extra="forbid")

    operation: Literal["generations"] = Field(description="The synchronous route the job runs.")
    input: ImageGenerationRequest = Field(description="That route's body.")
    webhook: str | None = Field(default=None, description="Posted to when the job ends.")
    priority: Literal["high", "normal", "low"] = "normal"


def _jobs(request: Request):
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise NotFoundError("The jobs API is off on this server (no jobs: section in its config).")
    return jobs


def _owner(request: Request) -> str:
    from serve_app.jobs.store import owner_of

    header = request.headers.get("authorization", "")
    return owner_of(header.partition(" ")[2].strip().encode() if header else None)


@router.post("/v1/images/jobs", status_code=202)
async def submit_job(request: Request, body: JobSubmission, service: Service,
                     idempotency_key: str | None = Header(default=None)) -> JSONResponse:
    """Submit a job: 202 with the job object."""
    from serve_app.jobs.store import JobRecord, new_job_id

    jobs, owner = _jobs(request), _owner(request)
    wire = body.input
    if "response_format" not in wire.model_fields_set:
        wire = wire.model_copy(update={"response_format": "url"})
    image_request = wire.to_request()
    await guarded(service.plan(image_request), service.config.ingress.retry_after_s)  # 400 now
    if body.webhook is not None:
        try:
            jobs.policy.check(body.webhook)
        except ValueError as exc:
            raise InvalidRequestError(f"webhook: {exc}", param="webhook") from None
    body_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    if idempotency_key:
        earlier = await asyncio.to_thread(jobs.store.idempotent, owner, idempotency_key, body_hash)
        if earlier == "":
            raise ConflictError("Idempotency-Key was used with another body.", param="Idempotency-Key")
        if earlier:
            record = await asyncio.to_thread(jobs.store.get, earlier)
            return JSONResponse(record.public(), status_code=202)
    data: dict[str, Any] = asdict(replace(image_request))
    data["_base_url"] = base_url(request)
    record = JobRecord(id=new_job_id(), operation=body.operation, owner=owner, request=data,
                       priority=body.priority, webhook=body.webhook)
    await asyncio.to_thread(jobs.store.put, record)
    if idempotency_key:
        await asyncio.to_thread(jobs.store.remember, owner, idempotency_key, body_hash, record.id)
    await asyncio.to_thread(jobs.enqueue, record)
    return JSONResponse(record.public(), status_code=202)


async def _owned(request: Request, job_id: str):
    jobs = _jobs(request)
    record = await asyncio.to_thread(jobs.store.get, job_id)
    if record is None or record.owner != _owner(request):  # another key's job: as unknown
        raise NotFoundError(f"No job with id '{job_id}'.", param="id")
    return jobs, record


@router.get("/v1/images/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> JSONResponse:
    """A job's state, and its result once it succeeded."""
    _, record = await _owned(request, job_id)
    return JSONResponse(record.public())


@router.post("/v1/images/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    """Cancel: a queued job never runs, a running one stops at its next step; 409 once ended."""
    from serve_app.jobs.store import FINAL

    jobs, record = await _owned(request, job_id)
    if record.status in FINAL:
        raise ConflictError(f"The job has already {record.status}.", param="id")
    await asyncio.to_thread(jobs.store.request_cancel, job_id)
    if record.status == "queued":  # it never runs: the consumer finds the flag first
        record.status, record.finished = "canceled", int(time.time())
        await asyncio.to_thread(jobs.store.put, record)
    return JSONResponse(record.public())
