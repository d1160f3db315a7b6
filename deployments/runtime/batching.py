"""Dynamic batching of jobs on one replica, with cancellation.

Ray Serve's ``@serve.batch`` keeps one queue per decorated function in the class, batches
by request count, and cannot tell compatible jobs from incompatible ones. Diffusion jobs
batch only when they share size, steps, guidance, strength and scheduler settings, and a
batch's cost is its number of images, so each replica has its own :class:`Batcher`:

- one queue for every kind of job, so pipeline calls on the replica never overlap;
- a batch takes the oldest job and every queued job with the same batch key, up to
  ``max_batch_images`` images and ``max_adapters`` distinct LoRA adapters (the UNet's
  slots: jobs of different adapters share a call, each row with its own); incompatible
  jobs wait for a later batch;
- a job whose caller went away (client disconnect, timeout) is dropped before it starts,
  and a running batch whose callers all went away stops at the next denoising step.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from deployments.contract import StageResult


class PipelineCancelled(Exception):
    """Raised inside a pipeline call when every job of its batch has been cancelled."""


@dataclass(eq=False)
class BatchEntry:
    """A queued job; ``token`` is set when its caller stops waiting."""

    kind: str
    job: Any
    inputs: tuple
    key: Hashable
    images: int
    future: asyncio.Future
    token: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)
    preview: Any = None  # a PreviewSink when the caller streams partial images
    adapters: frozenset = frozenset()  # the LoRA adapters it uses (lora_identity)


# How many of the latest batch sizes a replica keeps for tests and benchmarks.
RECENT_BATCHES = 1000


@dataclass
class BatchStats:
    """What a replica did: for tests, benchmarks and metrics."""

    pipeline_calls: int = 0
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the latest RECENT_BATCHES only
    cancelled_before_start: int = 0
    cancelled_running: int = 0
    steps: int = 0
    # Seconds from each job's arrival to the end of its first denoising step (the latest
    # RECENT_BATCHES jobs): how long a job waits to start, in either batching mode.
    first_step_waits: list[float] = field(default_factory=list)

    def first_step(self, queued_at: float, now: float) -> None:
        self.first_step_waits.append(now - queued_at)
        del self.first_step_waits[:-RECENT_BATCHES]


def batch_cancelled(entries: list[BatchEntry]) -> bool:
    return all(entry.token.is_set() for entry in entries)


def adapters_fit(held: frozenset, entry: BatchEntry, max_adapters: int | None) -> bool:
    """Whether ``entry`` may join a call whose jobs use the adapters ``held``: together
    they use at most ``max_adapters`` distinct ones (None: no limit)."""
    return max_adapters is None or len(held | entry.adapters) <= max_adapters


class JobQueue:
    """A replica's queue of jobs, which both batching modes hold (:class:`Batcher` here, the
    step loop's :class:`~deployments.runtime.steploop.StepBatcher`): what they share, and all of it.

    ``submit`` queues a job as a :class:`BatchEntry` and waits for its future, which the
    holder settles; a caller that goes away sets the entry's token, and leaves the queue if
    its job has not started. ``drain()`` (the holder's) runs as a task on the event loop
    whenever a job arrives and no drain task is running; it takes entries from ``pending``.
    """

    def __init__(self, drain: Callable[[], Awaitable[None]]):
        self.pending: list[BatchEntry] = []
        self.stats = BatchStats()
        self._drain = drain
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(
        self, kind: str, job: Any, inputs: tuple, key: Hashable, images: int, preview: Any = None,
        adapters: frozenset = frozenset(),
    ) -> Any:
        """Queue a job and wait for its result (raised if the job failed)."""
        loop = asyncio.get_running_loop()
        entry = BatchEntry(kind, job, inputs, (kind, key), images, loop.create_future(),
                           preview=preview, adapters=adapters)
        self.pending.append(entry)
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._task = loop.create_task(self._drain())
        try:
            return await entry.future
        except asyncio.CancelledError:
            # The caller is gone: skip the job if it has not started, stop its batch at
            # the next step if every job in it is gone.
            entry.token.set()
            if entry in self.pending:
                self.pending.remove(entry)
                self.stats.cancelled_before_start += 1
            raise


class Batcher:
    """Collects jobs and runs compatible ones through ``run_group`` in a worker thread.

    ``run_group(kind, entries)`` runs one pipeline call for all ``entries`` (same kind and
    key) and returns one result per entry, in order (an exception instance: that entry
    failed alone). Its jobs wait in a :class:`JobQueue`.
    """

    def __init__(
        self,
        run_group: Callable[[str, list[BatchEntry]], list[Any]],
        max_batch_images: int,
        batch_wait_timeout_s: float = 0.0,
        on_batch: Callable[[int, list[float]], None] | None = None,
        thread_name: str = "pipeline",
        max_adapters: int | None = None,
    ):
        self.run_group = run_group
        self.max_adapters = max_adapters
        # Every pipeline call of a replica runs on this one thread: CUDA graphs and
        # compiled kernels belong to the thread that made them, and torch's CPU thread
        # count is set per OS thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self.on_batch = on_batch
        self.max_batch_images = max_batch_images
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.queue = JobQueue(self._drain)
        # Seconds between the latest submission and the one before it, when that one was
        # still queued or running (else infinite): a batch waits for company only while
        # jobs arrive closer together than batch_wait_timeout_s (a burst); a lone job, or
        # the next of a client that waits for each answer, starts at once.
        self._last_arrival = float("-inf")
        self._arrival_gap = float("inf")
        self._running = False

    @property
    def stats(self) -> BatchStats:
        """What this replica's batches did (the queue's counters)."""
        return self.queue.stats

    async def submit(
        self, kind: str, job: Any, inputs: tuple, key: Hashable, images: int, preview: Any = None,
        adapters: frozenset = frozenset(),
    ) -> Any:
        """Queue a job and wait for its result (raised if the job failed)."""
        now = time.monotonic()
        in_flight = bool(self.queue.pending) or self._running
        self._arrival_gap = now - self._last_arrival if in_flight else float("inf")
        self._last_arrival = now
        return await self.queue.submit(kind, job, inputs, key, images, preview, adapters)

    def _take_batch(self) -> list[BatchEntry]:
        head = self.queue.pending[0]
        batch, total, held = [], 0, frozenset()
        for entry in self.queue.pending:
            if entry.key != head.key:
                continue
            if batch and total + entry.images > self.max_batch_images:
                break
            if batch and not adapters_fit(held, entry, self.max_adapters):
                continue  # a later job of the adapters held may still fit
            batch.append(entry)
            total += entry.images
            held |= entry.adapters
        for entry in batch:
            self.queue.pending.remove(entry)
        return batch

    def _compatible_images(self) -> int:
        head = self.queue.pending[0]
        return sum(e.images for e in self.queue.pending if e.key == head.key)

    async def _drain(self) -> None:
        while self.queue.pending:
            if (self.batch_wait_timeout_s > 0 and self._compatible_images() < self.max_batch_images
                    and self._arrival_gap <= self.batch_wait_timeout_s):
                # Jobs are arriving in a burst: give them a moment to join this batch.
                await asyncio.sleep(self.batch_wait_timeout_s)
                if not self.queue.pending:
                    break
            batch = [e for e in self._take_batch() if not e.future.done()]
            if not batch:
                continue
            self.stats.pipeline_calls += 1
            batch_images = sum(e.images for e in batch)
            self.stats.batch_sizes.append(batch_images)
            del self.stats.batch_sizes[:-RECENT_BATCHES]  # bounded on a long-lived replica
            if self.on_batch is not None:
                now = time.monotonic()
                self.on_batch(sum(e.images for e in batch), [now - e.queued_at for e in batch])
            steps_before, started = self.stats.steps, time.perf_counter()
            try:
                # As asyncio.to_thread does: the call sees this task's context (request ids).
                context = contextvars.copy_context()
                self._running = True
                try:
                    results = await asyncio.get_running_loop().run_in_executor(
                        self.executor, context.run, self.run_group, batch[0].kind, batch
                    )
                finally:
                    self._running = False
            except PipelineCancelled:
                self.stats.cancelled_running += len(batch)
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(PipelineCancelled("cancelled"))
                continue
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                continue
            seconds, steps = time.perf_counter() - started, self.stats.steps - steps_before
            self.stats.images += batch_images
            for entry, result in zip(batch, results):
                if isinstance(result, BaseException):
                    if not entry.future.done():
                        entry.future.set_exception(result)
                    continue
                if not entry.future.done():
                    share = entry.images / batch_images
                    # Every image of a batch goes through each of the batch's steps.
                    entry.future.set_result(StageResult(result, steps * entry.images, seconds * share))
