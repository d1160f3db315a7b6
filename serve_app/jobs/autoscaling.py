"""Autoscaling the task-consumer deployment on its jobs: the queue-length policy Ray Serve
ships for asynchronous inference, counting what our consumers have to do.

Ray's ``AsyncInferenceAutoscalingPolicy`` reads one queue's length through its broker client
(Redis or RabbitMQ, over tornado, which ``ray[serve]`` does not install). Ours is its arithmetic
(desired replicas = the workload over the target per replica), kept here because its workload
differs: the three priority queues on either broker (Redis, or the filesystem transport's
message files) plus the jobs running now (their leases). A job a consumer has taken is off the
queue, and a policy that saw only the queue would scale the consumers down under their running
jobs. Serve applies its bounds and delays (min/max replicas, upscale/downscale delays) around it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from serve_app.config import JobsConfig

logger = logging.getLogger("ray.serve")
POLICY = f"{__name__}:JobsAutoscalingPolicy"


def policy_kwargs(config: JobsConfig, poll_interval_s: float) -> dict:
    """What the policy needs of a JobsConfig, as Serve passes it (JSON: no webhook secret)."""
    return {"jobs": config.model_dump(mode="json", include={"broker_url", "backend_url", "data_folder", "queue"}),
            "poll_interval_s": poll_interval_s}


def consumer_options(config: JobsConfig) -> dict:
    """The consumer deployment's Serve options. With an autoscaling_config that names no
    policy of its own: this policy, aiming at max_ongoing_requests jobs per replica unless
    target_ongoing_requests is set."""
    options = config.deployment.serve_options()
    scaling = options.get("autoscaling_config")
    if scaling is not None and "policy" not in scaling:
        options["autoscaling_config"] = {
            "target_ongoing_requests": config.deployment.max_ongoing_requests, **scaling,
            "policy": {"policy_function": POLICY,
                       "policy_kwargs": policy_kwargs(config, config.autoscaling_poll_s)}}
    return options


def workload(config: JobsConfig) -> int:
    """Jobs waiting in the broker, of every priority, plus jobs running (or posting their
    webhook) on a consumer replica."""
    from serve_app.jobs.metrics import queue_depths
    from serve_app.jobs.store import JobStore, state_backend

    return sum(queue_depths(config).values()) + len(JobStore(state_backend(config)).leases())


class JobsAutoscalingPolicy:
    """Runs in Serve's controller, called by its autoscaling loop; counts the jobs in a task
    of its own every ``poll_interval_s`` (the broker is never waited for in the loop)."""

    def __init__(self, jobs: dict, poll_interval_s: float = 5.0):
        self.jobs = JobsConfig(**jobs)
        self.poll_interval_s = poll_interval_s
        self.workload = 0
        self._task: asyncio.Task | None = None
        self._polled = 0.0

    async def _poll(self) -> None:
        try:
            self.workload = await asyncio.to_thread(workload, self.jobs)
        except Exception as exc:  # noqa: BLE001 - the last count stands until the next poll
            logger.warning("counting the jobs of queue %r failed: %s", self.jobs.queue, exc)

    def __call__(self, ctx):
        """(desired replicas, state) for Serve's AutoscalingContext ``ctx``."""
        if (self._task is None or self._task.done()) and time.monotonic() - self._polled >= self.poll_interval_s:
            self._polled = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._poll())
        work = ctx.total_num_requests + self.workload
        state = {"jobs": self.workload}
        if ctx.current_num_replicas == 0:
            return (1 if work > 0 else 0), state
        return work / ctx.config.get_target_ongoing_requests(), state
