"""What the ingress holds for the jobs routes: the job records, the webhook policy, and the
broker to send jobs to (Ray's task processor adapter)."""

from __future__ import annotations

import os

from serve_app.config import AppConfig
from serve_app.jobs.broker import JOB_TASK, task_processor_config
from serve_app.jobs.store import JobRecord, JobStore, state_backend
from serve_app.jobs.webhooks import WEBHOOK_SECRET_ENV, WebhookPolicy


class Jobs:
    def __init__(self, config: AppConfig):
        from ray.serve.task_consumer import instantiate_adapter_from_config

        jobs = config.jobs
        self.store = JobStore(state_backend(config.jobs))
        self.policy = WebhookPolicy(tuple(jobs.webhooks.allowed_hosts),
                                    tuple(jobs.webhooks.allowed_http_hosts))
        self.adapter = instantiate_adapter_from_config(task_processor_config(jobs))
        self.signs_webhooks = bool(jobs.webhooks.secret or os.environ.get(WEBHOOK_SECRET_ENV))

    def enqueue(self, record: JobRecord) -> None:
        self.adapter.enqueue_job(JOB_TASK, record.id, record.priority)
