"""The jobs' broker, as Ray Serve's asynchronous inference takes it: a TaskProcessorConfig
for Celery (Ray's default adapter) on Redis or on Celery's filesystem transport."""

from __future__ import annotations

import os
from pathlib import Path

from serve_app.config import JobsConfig

# The task a job is: its id; the job record (store.py) holds the rest.
JOB_TASK = "serve_app.run_job"
PRIORITIES = {"high": 0, "normal": 3, "low": 6}  # kombu's Redis transport: 0 runs first


def _folders(config: JobsConfig) -> dict[str, str]:
    root = Path(config.data_folder)
    folders = {"data_folder_in": root / "queue", "data_folder_out": root / "queue",
               "processed_folder": root / "processed", "control_folder": root / "control"}
    for folder in [*folders.values(), root / "state"]:
        os.makedirs(folder, exist_ok=True)
    return {key: str(value) for key, value in folders.items()}


def task_processor_config(config: JobsConfig, consumer: bool = False):
    """Ray's TaskProcessorConfig for ``config``: late acknowledgement and requeue on a lost
    worker (Ray's adapter sets both), one job prefetched at a time, and on Redis the
    priority sub-queues the consumer takes in order."""
    from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

    if config.broker_url.startswith("filesystem://"):
        transport = _folders(config)
    else:
        transport = {"queue_order_strategy": "priority", "priority_steps": sorted(PRIORITIES.values()),
                     "sep": ":", "visibility_timeout": 3600}
    return TaskProcessorConfig(
        queue_name=config.queue,
        adapter_config=CeleryAdapterConfig(
            broker_url=config.broker_url, backend_url=config.state_url,
            broker_transport_options=transport,
            app_custom_config={"broker_connection_retry_on_startup": True,
                               "worker_prefetch_multiplier": 1,
                               "task_default_priority": PRIORITIES["normal"],
                               "result_expires": int(config.result_ttl_s),
                               "worker_hijack_root_logger": False},
        ),
        max_retries=config.max_retries,
        failed_task_queue_name=f"{config.queue}-failed",
    )
