"""The jobs' broker, as Ray Serve's asynchronous inference takes it: a TaskProcessorConfig
for Celery (Ray's default adapter) on Redis or on Celery's filesystem transport."""

from __future__ import annotations

import os
from pathlib import Path

from serve_app.config import JobsConfig
from serve_app.jobs.folders import private_folder

# The task a job is: its id; the job record (store.py) holds the rest.
JOB_TASK = "serve_app.run_job"
# One queue per priority, taken strictly in this order: on Redis by kombu's "priority" queue
# order, on the filesystem broker by PriorityFilesystemTransport below.
PRIORITIES = ("high", "normal", "low")


def priority_queue(queue: str, priority: str) -> str:
    return f"{queue}.{priority}"


def _rank(queue: str) -> int:
    """A queue's place in PRIORITIES (other queues, such as the dead letters', go last)."""
    suffix = queue.rsplit(".", 1)[-1]
    return PRIORITIES.index(suffix) if suffix in PRIORITIES else len(PRIORITIES)


def _folders(config: JobsConfig) -> dict[str, str]:
    root = Path(private_folder(config.data_folder))
    folders = {"data_folder_in": root / "queue", "data_folder_out": root / "queue",
               "processed_folder": root / "processed", "control_folder": root / "control"}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    return {key: str(value) for key, value in folders.items()}


def task_processor_config(config: JobsConfig, consumer: bool = False):
    """Ray's TaskProcessorConfig for ``config``: late acknowledgement and requeue on a lost
    worker (Ray's adapter sets both), one job prefetched per worker thread, and on Redis the
    priority sub-queues the consumer takes in order.

    On Redis a worker takes a message only when a thread is free (``worker_disable_prefetch``).
    Celery ignores that setting on other transports: on the filesystem broker a worker holds
    at most one message per thread (``worker_prefetch_multiplier`` 1), each run at once, plus
    retries waiting for their backoff. Those it loses if it dies (the transport hands a message
    out by deleting its file) are sent again by the consumers' sweep
    (``runner.redispatch_queued``)."""
    from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

    custom = {"broker_connection_retry_on_startup": True, "worker_prefetch_multiplier": 1,
              "result_expires": int(config.result_ttl_s), "worker_hijack_root_logger": False}
    if config.broker_url.startswith("filesystem://"):
        transport = _folders(config)
        custom["broker_transport"] = f"{__name__}:PriorityFilesystemTransport"
    else:
        transport = {"queue_order_strategy": "priority", "visibility_timeout": 3600}
        # A worker takes a job only when one of its threads is free: a job fetched early
        # would sit in the worker ahead of a higher-priority one that arrives after it.
        custom["worker_disable_prefetch"] = True
    return TaskProcessorConfig(
        queue_name=config.queue,
        adapter="serve_app.jobs.broker.PriorityQueuesAdapter",
        adapter_config=CeleryAdapterConfig(
            broker_url=config.broker, backend_url=config.state_url,
            broker_transport_options=transport, app_custom_config=custom,
        ),
        max_retries=config.max_retries,
        failed_task_queue_name=f"{config.queue}-failed",
    )


def _adapter_base():
    from ray.serve.task_processor import CeleryTaskProcessorAdapter

    return CeleryTaskProcessorAdapter


class PriorityQueuesAdapter(_adapter_base()):
    """Ray's Celery adapter with one queue per priority: jobs go to their priority's queue
    and the consumer's worker takes the queues in order. Ray's adapter consumes one queue;
    this subclass adds the others (its worker arguments and queue table)."""

    def initialize(self, consumer_concurrency: int = 4):
        super().initialize(consumer_concurrency)
        name = self._config.queue_name
        queues = dict(self._app.conf.task_queues or {})
        for priority in PRIORITIES:
            queue = priority_queue(name, priority)
            queues[queue] = {"exchange": queue, "exchange_type": "direct", "routing_key": queue}
        self._app.conf.update(task_queues=queues,
                              task_routes={"*": {"queue": priority_queue(name, "normal")}})

    def enqueue_job(self, task_name: str, job_id: str, priority: str) -> None:
        self._app.send_task(task_name, args=[job_id], task_id=job_id,
                            queue=priority_queue(self._config.queue_name, priority))

    def start_consumer(self, **kwargs):
        import threading

        from ray.serve import get_replica_context

        if self._worker_thread is not None and self._worker_thread.is_alive():
            return
        self._worker_hostname = f"{self._app.main}_{get_replica_context().replica_tag}"
        queues = ",".join(priority_queue(self._config.queue_name, p) for p in PRIORITIES)
        self._worker_thread = threading.Thread(
            target=self._app.worker_main,
            args=(["worker", f"--hostname={self._worker_hostname}", "-Q", queues],), daemon=True)
        self._worker_thread.start()


def _filesystem_transport():
    import contextlib
    import tempfile
    import uuid
    from queue import Empty
    from time import monotonic

    from kombu.exceptions import ChannelError
    from kombu.transport import filesystem
    from kombu.utils.encoding import str_to_bytes
    from kombu.utils.json import dumps

    class _InPriorityOrder:
        """kombu's queue cycle, strict: each fetch tries the consumed queues from the highest
        priority down (kombu's virtual transports otherwise take their queues in turns)."""

        def __init__(self, fun, resources, predicate=Exception):
            self.fun, self.resources, self.predicate = fun, resources, predicate

        def get(self, callback, **kwargs):
            for queue in sorted(self.resources, key=_rank):
                try:
                    return self.fun(queue, callback, **kwargs)
                except self.predicate:
                    continue
            raise self.predicate()

        def close(self):
            pass

    class PriorityChannel(filesystem.Channel):
        def _reset_cycle(self):
            self._cycle = _InPriorityOrder(self._get_and_deliver, self._active_queues, Empty)

        def _put(self, queue, payload, **kwargs):
            """kombu's message file, written whole under a temporary name, then renamed to the
            name consumers look for: kombu writes it in place, so a consumer could take a
            message half written."""
            name = "{}_{}.{}.msg".format(int(round(monotonic() * 1000)), uuid.uuid4(), queue)
            fd, tmp = tempfile.mkstemp(dir=self.data_folder_out, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(str_to_bytes(dumps(payload)))
                os.replace(tmp, os.path.join(self.data_folder_out, name))
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise ChannelError(f"Cannot add file {name!r} to directory") from exc

    class Transport(filesystem.Transport):
        Channel = PriorityChannel

    return Transport


# Celery's filesystem transport (kombu's), taking the priority queues in order.
PriorityFilesystemTransport = _filesystem_transport()


def waiting_job_ids(config: JobsConfig) -> set[str]:
    """The ids of the jobs whose message waits in one of the priority queues (Celery puts a
    task's id in its message's headers): the filesystem broker's message files, or the Redis
    lists. A message a consumer has taken is not in them."""
    import json

    queues = [priority_queue(config.queue, priority) for priority in PRIORITIES]
    if config.broker_url.startswith("filesystem://"):
        folder = Path(config.data_folder) / "queue"
        raw = []
        for name in os.listdir(folder) if folder.exists() else []:
            if any(name.endswith(f".{queue}.msg") for queue in queues):
                try:
                    raw.append((folder / name).read_bytes())
                except FileNotFoundError:  # taken meanwhile
                    pass
    else:
        import redis

        client = redis.Redis.from_url(config.broker)
        raw = [item for queue in queues for item in client.lrange(queue, 0, -1)]
    found = set()
    for item in raw:
        try:
            found.add(json.loads(item)["headers"]["id"])
        except (ValueError, KeyError, TypeError):
            continue  # not a task of ours
    return found
