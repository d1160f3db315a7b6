"""Prometheus metrics of the jobs API, exported through Ray's metrics agent beside the
ingress's and the replicas': queue depth per priority, jobs by final status, time queued and
running, webhook deliveries."""

from __future__ import annotations

import os
from pathlib import Path

from ray.serve import metrics

from serve_app.config import JobsConfig
from serve_app.jobs.broker import PRIORITIES, priority_queue

_BUCKETS = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]


class JobMetrics:
    def __init__(self):
        self.queued = metrics.Gauge("serve_app_jobs_queued", "Jobs waiting in the broker, by priority.",
                                    ("priority",))
        self.finished = metrics.Counter("serve_app_jobs", "Jobs ended, by final status.", ("status",))
        self.time_queued = metrics.Histogram("serve_app_job_queued_seconds",
                                             "Seconds from submit to the start of its (last) run.",
                                             boundaries=_BUCKETS)
        self.time_running = metrics.Histogram("serve_app_job_running_seconds",
                                              "Seconds of a job's (last) run.", boundaries=_BUCKETS)
        self.webhooks = metrics.Counter("serve_app_webhooks", "Webhooks, by outcome (delivered or "
                                        "failed after every attempt).", ("outcome",))
        self.webhook_attempts = metrics.Counter("serve_app_webhook_attempts", "Webhook POSTs tried.")

    def on_finish(self, status: str, created: int, started: int | None, finished: int) -> None:
        self.finished.inc(1, {"status": status})
        if started is not None:
            self.time_queued.observe(max(0, started - created))
            self.time_running.observe(max(0, finished - started))

    def on_webhook(self, delivered: bool, attempts: int) -> None:
        self.webhooks.inc(1, {"outcome": "delivered" if delivered else "failed"})
        self.webhook_attempts.inc(attempts)

    def set_queue_depths(self, depths: dict[str, int]) -> None:
        for priority, depth in depths.items():
            self.queued.set(depth, {"priority": priority})


def queue_depths(config: JobsConfig) -> dict[str, int]:
    """Messages waiting in each priority's queue: a Redis list's length, or the filesystem
    broker's message files of that queue."""
    queues = {priority: priority_queue(config.queue, priority) for priority in PRIORITIES}
    if config.broker_url.startswith("filesystem://"):
        folder = Path(config.data_folder) / "queue"
        names = os.listdir(folder) if folder.exists() else []
        return {p: sum(1 for n in names if n.endswith(f".{q}.msg")) for p, q in queues.items()}
    import redis

    client = redis.Redis.from_url(config.broker)
    return {p: int(client.llen(q)) for p, q in queues.items()}
