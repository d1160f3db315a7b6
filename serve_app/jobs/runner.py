"""Running a job in the consumer replica: the same planning and execution as the synchronous
routes (the images service), the job record kept up to date, a cancel asked for while it
runs honoured at the next denoising step, a webhook when it ends."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import fields

from serve_app.config import AppConfig
from serve_app.jobs.store import FINAL, JobRecord, JobStore
from serve_app.jobs.webhooks import Webhooks
from deployments.image_store import INPUT
from serve_app.service.errors import APIError, error_from_exception
from serve_app.service.images import ImagesService
from serve_app.service.request import ImageRequest
from serve_app.service.store import ImageStoreClient
from serve_app.service.uploads import BytesUpload

logger = logging.getLogger("ray.serve")
# A running job's lease, renewed every second while it runs and every LEASE_S / 4 while its
# webhook is posted: a job whose lease ran out (its consumer replica died) goes back to the
# broker, or has its webhook posted by another replica (recover_lost below).
LEASE_S = 20.0
# Webhook deliveries a consumer replica posts at once (more wait their turn, off the job slots).
MAX_DELIVERIES = 32
_REQUEST_FIELDS = {f.name for f in fields(ImageRequest)}


def request_from(data: dict) -> ImageRequest:
    values = {k: tuple(tuple(p) for p in v) if k == "loras" else
              (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in _REQUEST_FIELDS}
    return ImageRequest(**values)


class JobServerFault(RuntimeError):
    """A run that failed for the server's reasons: raised to the broker, which retries it."""


class JobInputGoneError(APIError):
    """A job's upload is no longer in the image store: no retry can bring it back, so the job
    fails at once (the server's fault: a store kept in memory loses uploads when it restarts)."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, name: str):
        super().__init__(f"The job's '{name}' upload is no longer in the server's image store "
                         "(it expired, or the store lost it when it restarted); submit the job "
                         "again.", param=name, code="input_gone")


class JobRunner:
    """What the consumer replica does with a job id."""

    def __init__(self, config: AppConfig, service: ImagesService, store: JobStore, images_store,
                 metrics=None):
        self.config, self.service, self.store = config, service, store
        # The image store holding the jobs' uploads, its calls bounded in time.
        self.images = ImageStoreClient.of(images_store, config)
        self.metrics = metrics  # a JobMetrics in the replica; None in unit tests
        jobs = config.jobs
        self.webhooks = Webhooks(jobs.webhooks)  # its policy checked again at delivery
        self.deliveries: set[asyncio.Task] = set()  # webhooks being posted
        self._delivery_slots = asyncio.Semaphore(MAX_DELIVERIES)

    async def _get(self, job_id: str) -> JobRecord | None:
        return await asyncio.to_thread(self.store.get, job_id)

    async def _put(self, record: JobRecord) -> None:
        await asyncio.to_thread(self.store.put, record)

    async def run(self, job_id: str, retries: int = 0) -> str:
        """Run one delivery of a job (``retries``: the broker's retries of it so far); returns
        its status. Raises on a server fault, so the broker retries it with backoff; past
        ``jobs.max_retries`` the job is failed and the broker moves it to its dead-letter
        queue."""
        record = await self._get(job_id)
        if record is None:
            return "unknown"
        leases = await asyncio.to_thread(self.store.leases)
        held = leases.get(job_id, 0) > time.time()  # running, or its webhook being posted
        if record.status == "canceled" and not record.notified and not held:
            return await self._finish(record, "canceled")  # canceled while queued: end it here
        if record.status in FINAL:
            return record.status  # a duplicate delivery: done already
        if record.status == "running" and held:
            return "running"  # another consumer runs it now (a redelivery): it stays theirs
        if await asyncio.to_thread(self.store.cancel_requested, job_id):
            return await self._finish(record, "canceled")
        record.status, record.started, record.attempts = "running", int(time.time()), record.attempts + 1
        await asyncio.to_thread(self.store.renew_lease, job_id, time.time() + LEASE_S)
        await self._put(record)
        work = asyncio.ensure_future(self._execute(record))
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=1.0)
                if work.done():
                    break
                await asyncio.to_thread(self.store.renew_lease, job_id, time.time() + LEASE_S)
                if await asyncio.to_thread(self.store.cancel_requested, job_id):
                    work.cancel()  # the replica stops the batch's rows at the next step
                    await asyncio.gather(work, return_exceptions=True)
                    return await self._finish(record, "canceled")
            response = work.result()
        except JobInputGoneError as error:  # no retry brings it back
            return await self._finish(record, "failed", error=error)
        except APIError as error:
            if error.status_code < 500:  # the client's: never retried
                return await self._finish(record, "failed", error=error)
            return await self._server_fault(record, error, retries)
        except Exception as exc:  # noqa: BLE001 - mapped, logged with its traceback
            return await self._server_fault(record, error_from_exception(exc), retries)
        record.result = json.loads(response.model_dump_json(exclude_none=True))
        record.error = None  # an earlier run's, if it was retried
        return await self._finish(record, "succeeded")

    async def _execute(self, record: JobRecord):
        request = request_from(record.request)
        uploads = {}
        for name, image_id in record.inputs.items():
            found = await self.images.get(image_id, INPUT)  # a 503 past its timeout: retried
            if found is None:
                raise JobInputGoneError(name)
            uploads[name] = BytesUpload(found[0])
        plan = await self.service.plan(request, uploads.get("image"), uploads.get("mask"))
        return await self.service.execute(plan, record.request.get("_base_url", ""),
                                          owner=record.owner)

    async def _server_fault(self, record: JobRecord, error: APIError, retries: int) -> str:
        if retries >= self.config.jobs.max_retries:
            await self._finish(record, "failed", error=error)
        else:
            record.status, record.error = "queued", error.to_response().error.model_dump()
            await self._put(record)
            await asyncio.to_thread(self.store.drop_lease, record.id)
        raise JobServerFault(f"job {record.id}, attempt {record.attempts}: {error.message}")

    def _has_webhook(self, record: JobRecord) -> bool:
        return bool(record.webhook and self.webhooks.secret_for(record.owner))

    async def _finish(self, record: JobRecord, status: str, error: APIError | None = None) -> str:
        """End the job: its final record, then its webhook posted in the background, so the
        broker's slot takes the next job while a failing receiver is retried."""
        record.status, record.finished = status, record.finished or int(time.time())
        record.notified = not self._has_webhook(record)  # else once its webhook is posted
        if error is not None:
            record.error = error.to_response().error.model_dump()
        await self._put(record)
        await self._drop_inputs(record)
        if self.metrics is not None:
            self.metrics.on_finish(status, record.created, record.started, record.finished)
        logger.info("job %s %s after %d attempt(s)", record.id, status, record.attempts)
        if record.notified:
            await asyncio.to_thread(self.store.drop_lease, record.id)
        else:
            self.notify_later(record)
        return status

    async def _drop_inputs(self, record: JobRecord) -> None:
        """Delete an ended job's uploads from the image store (else they wait for their TTL)."""
        if not record.inputs or self.images is None:
            return
        try:
            await self.images.delete(list(record.inputs.values()))
        except Exception:  # noqa: BLE001 - logged; the uploads expire with their TTL instead
            logger.warning("job %s: deleting its uploads from the image store failed", record.id,
                           exc_info=True)

    def notify_later(self, record: JobRecord) -> None:
        """Post an ended job's webhook in the background, holding the job's lease until the
        delivery ends: a replica lost mid-delivery leaves it to another replica's sweep
        (recover_lost), which posts it again under the same ``webhook-id``."""
        task = asyncio.ensure_future(self._notify(record))
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def _notify(self, record: JobRecord) -> None:
        lease = asyncio.ensure_future(self._hold_lease(record.id))
        try:
            body = json.dumps({"type": f"image.job.{record.status}", "timestamp": record.finished,
                               "data": record.public()}).encode()
            async with self._delivery_slots:
                delivery = await self.webhooks.deliver(record.webhook, body, record.owner,
                                                       f"msg_{record.id}")
            logger.log(logging.WARNING if delivery.refused else logging.INFO,
                       "job %s webhook delivered=%s attempts=%d last=%s", record.id,
                       delivery.delivered, delivery.attempts, delivery.last)
            if self.metrics is not None:
                self.metrics.on_webhook(delivery.delivered, delivery.attempts)
            record.notified = True
            await self._put(record)
        except Exception:  # noqa: BLE001 - logged; the lease runs out and a sweep tries again
            logger.exception("job %s: posting its webhook failed", record.id)
            return
        finally:
            lease.cancel()
        await asyncio.to_thread(self.store.drop_lease, record.id)

    async def _hold_lease(self, job_id: str) -> None:
        while True:
            await asyncio.to_thread(self.store.renew_lease, job_id, time.time() + LEASE_S)
            await asyncio.sleep(LEASE_S / 4)


async def recover_lost(store: JobStore, enqueue, notify=None, now: float | None = None) -> list[str]:
    """Take over every job whose lease ran out, its consumer replica lost (the filesystem
    broker loses an unacknowledged message with its consumer; Redis would redeliver it only
    after its visibility timeout): a running one goes back to the broker, an ended one whose
    webhook was being posted has it posted by ``notify``. Returns their ids."""
    now = time.time() if now is None else now
    lost = []
    for job_id, until in (await asyncio.to_thread(store.leases)).items():
        if until >= now:
            continue
        record = await asyncio.to_thread(store.get, job_id)
        await asyncio.to_thread(store.drop_lease, job_id)
        if record is not None and record.status in FINAL and not record.notified and notify:
            logger.warning("job %s: its consumer was lost posting its webhook; posting it again", job_id)
            notify(record)
            lost.append(job_id)
            continue
        if record is None or record.status != "running":
            continue
        record.status = "queued"
        await asyncio.to_thread(store.put, record)
        await asyncio.to_thread(enqueue, record)
        logger.warning("job %s: its consumer was lost mid-run; sent back to the queue", job_id)
        lost.append(job_id)
    return lost
