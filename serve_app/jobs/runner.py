"""Running a job in the consumer replica: the same planning and execution as the synchronous
routes (the images service), the job record kept up to date, a cancel asked for while it
runs honoured at the next denoising step, a webhook when it ends."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import fields, replace

from serve_app.config import AppConfig
from serve_app.jobs.store import FINAL, CorruptRecordError, JobRecord, JobStore, lease_until, new_holder
from serve_app.jobs.webhooks import Webhooks
from serve_app.service.store import INPUT
from serve_app.protocol.errors import APIError, error_from_exception
from serve_app.service.images import ImagesService
from serve_app.protocol.request import ImageRequest
from serve_app.service.store import ImageStoreClient
from serve_app.service.uploads import BytesUpload

logger = logging.getLogger("ray.serve")
# A running job's lease, renewed every second while it runs and every LEASE_S / 4 while its
# webhook is posted: a job whose lease ran out (its consumer replica died) goes back to the
# broker, or has its webhook posted by another replica (recover_lost below).
LEASE_S = 20.0
# A queued job whose message is not in the broker this long after it was sent is sent again
# (redispatch_queued); longer than a retry's backoff (60 s at most), which the broker holds
# outside its queues.
REDISPATCH_S = 120.0
# Webhook deliveries a consumer replica posts at once (more wait their turn, off the job slots).
MAX_DELIVERIES = 32
_REQUEST_FIELDS = {f.name for f in fields(ImageRequest)}


def request_from(data: dict) -> ImageRequest:
    values = {k: tuple(tuple(p) for p in v) if k == "loras" else
              (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in _REQUEST_FIELDS}
    return ImageRequest(**values)


class JobRetryError(RuntimeError):
    """Raised to the broker when a job's attempt failed for the server's reasons (a 5xx
    :class:`~serve_app.protocol.errors.APIError`), so that the broker retries it."""


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

    async def _release(self, job_id: str, lease: str) -> None:
        await asyncio.to_thread(self.store.release_lease, job_id, lease)

    async def handle_delivery(self, job_id: str, retries: int = 0) -> str:
        """Run one delivery of a job (``retries``: the broker's retries of it so far); returns
        its status. The job's lease is claimed first, atomically: a delivery that finds it
        held (the job runs, or its webhook is posted, elsewhere) does nothing, so a job runs
        once however many messages name it. Raises on a server fault, so the broker retries it
        with backoff; past ``jobs.max_retries`` the job is failed and the broker moves it to
        its dead-letter queue."""
        lease = new_holder()
        if not await asyncio.to_thread(self.store.claim_lease, job_id, lease, time.time() + LEASE_S):
            return "running"  # another replica has it now (a redelivery): it stays theirs
        try:
            for _ in range(3):  # again if the record changed under us (a cancel while queued)
                try:
                    record = await self._get(job_id)
                except CorruptRecordError:
                    await asyncio.to_thread(self.store.quarantine, job_id)
                    return "unknown"
                if record is None:
                    await self._release(job_id, lease)
                    return "unknown"
                if record.status == "canceled" and not record.notified:
                    return await self._finish(record, "canceled", lease)  # canceled while queued
                if record.status in FINAL:
                    if not record.notified:  # its webhook's replica was lost: post it here
                        self.notify_later(record, lease)
                    else:
                        await self._release(job_id, lease)
                    return record.status  # a duplicate delivery: done already
                if await asyncio.to_thread(self.store.cancel_requested, job_id):
                    return await self._finish(record, "canceled", lease)
                running = replace(record, status="running", started=int(time.time()),
                                  attempts=record.attempts + 1)
                if await asyncio.to_thread(self.store.replace, running, record, lease):
                    break
            else:
                await self._release(job_id, lease)
                return "unknown"
        except BaseException:
            await asyncio.shield(self._release(job_id, lease))
            raise
        await asyncio.to_thread(self.store.unmark_queued, job_id)
        return await self._run_leased(running, lease, retries)

    async def _run_leased(self, record: JobRecord, lease: str, retries: int) -> str:
        job_id = record.id
        work = asyncio.ensure_future(self._execute(record))
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=1.0)
                if work.done():
                    break
                if not await asyncio.to_thread(self.store.renew_lease, job_id, lease, time.time() + LEASE_S):
                    # This replica stalled past its lease and another took the job over: it
                    # is theirs now, so this run stops and writes nothing.
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                    logger.warning("job %s: its lease was taken over; this run stops", job_id)
                    return "lost"
                if await asyncio.to_thread(self.store.cancel_requested, job_id):
                    work.cancel()  # the replica stops the batch's rows at the next step
                    await asyncio.gather(work, return_exceptions=True)
                    return await self._finish(record, "canceled", lease)
            response = work.result()
        except JobInputGoneError as error:  # no retry brings it back
            return await self._finish(record, "failed", lease, error=error)
        except APIError as error:
            if error.status_code < 500:  # the client's: never retried
                return await self._finish(record, "failed", lease, error=error)
            return await self._server_fault(record, lease, error, retries)
        except Exception as exc:  # noqa: BLE001 - mapped, logged with its traceback
            return await self._server_fault(record, lease, error_from_exception(exc), retries)
        record.result = json.loads(response.model_dump_json(exclude_none=True))
        record.error = None  # an earlier run's, if it was retried
        return await self._finish(record, "succeeded", lease)

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

    async def _server_fault(self, record: JobRecord, lease: str, error: APIError, retries: int) -> str:
        if retries >= self.config.jobs.max_retries:
            if await self._finish(record, "failed", lease, error=error) == "lost":
                return "lost"
        else:
            record.status, record.error = "queued", error.to_response().error.model_dump()
            if not await asyncio.to_thread(self.store.put_leased, record, lease):
                return "lost"  # taken over: the new holder runs it, no retry of ours
            await asyncio.to_thread(self.store.mark_queued, record.id)
            await self._release(record.id, lease)
        raise JobRetryError(f"job {record.id}, attempt {record.attempts}: {error.message}")

    def _has_webhook(self, record: JobRecord) -> bool:
        return bool(record.webhook and self.webhooks.secret_for(record.owner))

    async def _finish(self, record: JobRecord, status: str, lease: str,
                      error: APIError | None = None) -> str:
        """End the job: its final record, written only while ``lease`` holds it ("lost",
        and nothing more, if another replica took it over), then its webhook posted in the
        background, so the broker's slot takes the next job while a failing receiver is
        retried."""
        record.status, record.finished = status, record.finished or int(time.time())
        record.notified = not self._has_webhook(record)  # else once its webhook is posted
        if error is not None:
            record.error = error.to_response().error.model_dump()
        if not await asyncio.to_thread(self.store.put_leased, record, lease):
            logger.warning("job %s: its lease was taken over before it ended %s here", record.id, status)
            return "lost"
        await asyncio.to_thread(self.store.unmark_queued, record.id)
        await self._drop_inputs(record)
        if self.metrics is not None:
            self.metrics.on_finish(status, record.created, record.started, record.finished)
        logger.info("job %s %s after %d attempt(s)", record.id, status, record.attempts)
        if record.notified:
            await self._release(record.id, lease)
        else:
            self.notify_later(record, lease)
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

    def notify_later(self, record: JobRecord, lease: str) -> None:
        """Post an ended job's webhook in the background, holding the job's lease (``lease``,
        claimed already) until the delivery ends: a replica lost mid-delivery leaves it to
        another replica's sweep (recover_lost), which posts it again under the same
        ``webhook-id``; a delivery whose lease was taken over stops."""
        task = asyncio.ensure_future(self._notify(record, lease))
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def _notify(self, record: JobRecord, lease: str) -> None:
        body = json.dumps({"type": f"image.job.{record.status}", "timestamp": record.finished,
                           "data": record.public()}).encode()
        # The lease is renewed from now on, the wait for a delivery slot included.
        holding = asyncio.ensure_future(self._hold_lease(record.id, lease, asyncio.current_task()))
        try:
            try:
                async with self._delivery_slots:
                    outcome = await self.webhooks.deliver(record.webhook, body, record.owner,
                                                          f"msg_{record.id}")
            finally:
                holding.cancel()
            logger.log(logging.WARNING if outcome.refused else logging.INFO,
                       "job %s webhook delivered=%s attempts=%d last=%s", record.id,
                       outcome.delivered, outcome.attempts, outcome.last)
            if self.metrics is not None:
                self.metrics.on_webhook(outcome.delivered, outcome.attempts)
            record.notified = True
            if not await asyncio.to_thread(self.store.put_leased, record, lease):
                return  # taken over meanwhile: the new holder records it
        except asyncio.CancelledError:
            logger.warning("job %s: its lease was taken over while its webhook was posted", record.id)
            return
        except Exception:  # noqa: BLE001 - logged; the lease runs out and a sweep tries again
            logger.exception("job %s: posting its webhook failed", record.id)
            return
        await self._release(record.id, lease)

    async def _hold_lease(self, job_id: str, lease: str, delivery: asyncio.Task) -> None:
        """Renew ``lease`` until cancelled; stop ``delivery`` if the lease was taken over."""
        while True:
            await asyncio.sleep(LEASE_S / 4)
            if not await asyncio.to_thread(self.store.renew_lease, job_id, lease, time.time() + LEASE_S):
                delivery.cancel()
                return


async def recover_lost(store: JobStore, enqueue, notify=None, now: float | None = None) -> list[str]:
    """Take over every job whose lease ran out, its consumer replica lost (the filesystem
    broker loses an unacknowledged message with its consumer; Redis would redeliver it only
    after its visibility timeout): a running one goes back to the broker, an ended one whose
    webhook was being posted has it posted by ``notify(record, lease)``. Each takeover is a
    compare-and-set on the lease that ran out, so of several sweepers (and a stalled holder
    renewing late) one wins. An unreadable record is moved aside and the sweep goes on.
    Returns the ids taken over."""
    now = time.time() if now is None else now
    lost = []
    for job_id, stored in (await asyncio.to_thread(store.raw_leases)).items():
        if lease_until(stored) >= now:
            continue
        lease = new_holder()
        if not await asyncio.to_thread(store.claim_lease, job_id, lease, now + LEASE_S, now, stored):
            continue  # another sweeper took it, or its holder renewed it
        try:
            record = await asyncio.to_thread(store.get, job_id)
        except CorruptRecordError:
            await asyncio.to_thread(store.quarantine, job_id)
            continue
        if record is not None and record.status in FINAL and not record.notified and notify:
            logger.warning("job %s: its consumer was lost posting its webhook; posting it again", job_id)
            notify(record, lease)
            lost.append(job_id)
            continue
        if record is None or record.status != "running":
            await asyncio.to_thread(store.release_lease, job_id, lease)
            continue
        record.status = "queued"
        if not await asyncio.to_thread(store.put_leased, record, lease):
            continue
        # Marked before the lease is given back: if the message is lost on its way (this
        # replica dies, the broker fails), redispatch_queued sends it again.
        await asyncio.to_thread(store.mark_queued, job_id, now)
        await asyncio.to_thread(store.release_lease, job_id, lease)
        await asyncio.to_thread(enqueue, record)
        logger.warning("job %s: its consumer was lost mid-run; sent back to the queue", job_id)
        lost.append(job_id)
    return lost


async def redispatch_queued(store: JobStore, enqueue, waiting, now: float | None = None,
                            after_s: float | None = None) -> list[str]:
    """Send again every queued job last sent more than ``after_s`` ago whose message is not
    waiting in the broker (``waiting()``: the job ids in its queues): a message lost with a
    consumer that had taken it (the filesystem broker deletes a message when it hands it
    out), or never sent (an ingress lost between the record and the message). A message sent
    twice is harmless: the job's lease lets one delivery run it."""
    now = time.time() if now is None else now
    after_s = REDISPATCH_S if after_s is None else after_s
    sent, in_broker = [], None
    for job_id, at in (await asyncio.to_thread(store.queued_marks)).items():
        if at >= now - after_s:
            continue
        try:
            record = await asyncio.to_thread(store.get, job_id)
        except CorruptRecordError:
            await asyncio.to_thread(store.quarantine, job_id)
            continue
        # A job canceled while queued still needs its message: its run ends it (the webhook).
        if record is None or not (record.status == "queued" or
                                  (record.status == "canceled" and not record.notified)):
            await asyncio.to_thread(store.unmark_queued, job_id)
            continue
        if in_broker is None:
            in_broker = await asyncio.to_thread(waiting)
        await asyncio.to_thread(store.mark_queued, job_id, now)
        if job_id in in_broker:
            continue  # waiting its turn
        await asyncio.to_thread(enqueue, record)
        logger.warning("job %s: queued with no message in the broker; sent again", job_id)
        sent.append(job_id)
    return sent
