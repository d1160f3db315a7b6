"""What the ingress holds for the jobs routes: the job records, the webhooks' policy and
secrets, and the broker to send jobs to (Ray's task processor adapter)."""

from __future__ import annotations

from serve_app.config import AppConfig
from serve_app.jobs.broker import JOB_TASK, task_processor_config
from serve_app.jobs.store import JobRecord, JobStore, state_backend
from serve_app.jobs.webhooks import Webhooks


class Jobs:
    def __init__(self, config: AppConfig):
        from ray.serve.task_consumer import instantiate_adapter_from_config

        jobs = config.jobs
        self.store = JobStore(state_backend(config.jobs))
        self.webhooks = Webhooks(jobs.webhooks)  # the policy and secrets checked at submit
        self.adapter = instantiate_adapter_from_config(task_processor_config(jobs))

    def enqueue(self, record: JobRecord) -> None:
        self.adapter.enqueue_job(JOB_TASK, record.id, record.priority)
