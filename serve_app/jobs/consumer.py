"""The task-consumer deployment: Ray Serve's asynchronous inference (``@task_consumer``) runs
a Celery worker in each replica, which takes jobs from the broker and hands each to a
:class:`JobRunner` on the replica's own event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from serve_app.config import AppConfig, load_app_config
from serve_app.jobs.broker import JOB_TASK, task_processor_config


def consumer_class(config: AppConfig):
    """The consumer deployment's class, made for ``config`` (the decorator takes the broker)."""
    from ray.serve.task_consumer import task_consumer, task_handler

    class JobsConsumer:
        def __init__(self, config: AppConfig | dict, handles: dict[str, Any], images_store: Any):
            from serve_app.jobs.runner import JobRunner
            from serve_app.jobs.store import JobStore, state_backend
            from serve_app.protocol.keys import load_api_keys
            from serve_app.service.images import ImagesService

            self.config = load_app_config(config)
            store = JobStore(state_backend(self.config.jobs))
            from serve_app.jobs.metrics import JobMetrics

            self.metrics = JobMetrics()
            # A job is planned again where it runs: the same keys may lower its moderation.
            safety = self.config.safety
            low_owners = (load_api_keys().owners_named(safety.allow_low_keys)
                          if safety is not None and safety.allow_low_keys else frozenset())
            self.runner = JobRunner(self.config, ImagesService(self.config, handles, images_store,
                                                               low_moderation_owners=low_owners),
                                    store, images_store, self.metrics)
            # Celery's worker threads hand jobs to this loop, where the images service runs.
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="jobs-loop", daemon=True).start()
            from serve_app.jobs.client import Jobs

            self.sender = Jobs(self.config)
            asyncio.run_coroutine_threadsafe(self._recover_forever(store), self.loop)

        async def _recover_forever(self, store):
            """Every LEASE_S / 2: take over lost jobs, send again queued ones that have no
            message, expire old keys, read the queue depths. Each step on its own, so one
            that fails (a store stall, a bad record) leaves the others working."""
            import logging
            from functools import partial

            from serve_app.jobs.broker import waiting_job_ids
            from serve_app.jobs.metrics import queue_depths
            from serve_app.jobs.runner import LEASE_S, recover_lost, redispatch_queued

            jobs = self.config.jobs
            steps = {
                "recovering lost jobs": lambda: recover_lost(store, self.sender.enqueue,
                                                             self.runner.notify_later),
                "sending queued jobs again": lambda: redispatch_queued(
                    store, self.sender.enqueue, partial(waiting_job_ids, jobs)),
                "expiring old job keys": lambda: asyncio.to_thread(store.expire, jobs.result_ttl_s),
                "reading the queue depths": self._read_queue_depths,
            }
            while True:
                for name, step in steps.items():
                    try:
                        await step()
                    except Exception:  # noqa: BLE001 - logged; the next sweep tries again
                        logging.getLogger("ray.serve").exception("%s failed", name)
                await asyncio.sleep(LEASE_S / 2)

        async def _read_queue_depths(self):
            from serve_app.jobs.metrics import queue_depths

            self.metrics.set_queue_depths(await asyncio.to_thread(queue_depths, self.config.jobs))

        @task_handler(name=JOB_TASK)
        def run_job(self, job_id: str) -> str:
            from celery import current_task

            retries = current_task.request.retries if current_task is not None else 0
            delivery = self.runner.handle_delivery(job_id, retries)
            return asyncio.run_coroutine_threadsafe(delivery, self.loop).result()

    return task_consumer(task_processor_config=task_processor_config(config.jobs))(JobsConsumer)
