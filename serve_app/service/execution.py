"""Running a plan: one handle call per stage, each stage's response handed to the next,
then the safety check; or, for a streamed plan, previews as they come.

Intermediate results (latents, images) go from replica to replica by reference
(:class:`~deployments.contract.Upstream`) and never come back through the ingress. Every call is
``handle.run.remote(job, *inputs)``: the job's type says what the replica does with it
(deployments/contract.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Collection, TypeVar

from deployments.contract import ImageToImageJob, SafetyJob, Upstream
from deployments.errors import UpstreamLost
from serve_app.config import SAFETY_NAME
from serve_app.protocol.errors import ModelUnavailableError
from serve_app.service.planning import GenerationPlan, Stage
from serve_app.service.uploads import resize

logger = logging.getLogger("ray.serve")  # Serve adds the request id to each line


def _sized_inputs(stage: Stage) -> tuple:
    """The first stage's uploads at the size its job asks for: an edit's image (and mask,
    kept sharp with nearest-neighbour) are resized to the output size; upscalers take the
    image as it is."""
    job = stage.job
    if not isinstance(job, ImageToImageJob) or not stage.inputs:
        return stage.inputs
    from PIL import Image

    image, *mask = stage.inputs
    sized = (resize(image, job.width, job.height),)
    if mask:
        sized += (resize(mask[0], job.width, job.height, Image.Resampling.NEAREST),)
    return sized


async def _upstream(response) -> Upstream:
    """A stage's response as the next stage's input, by reference (see :class:`Upstream`).
    Waits only until Serve has sent the request to a replica, not for its result."""
    return Upstream(await response._to_object_ref())


def _check(handles: dict[str, Any], job: SafetyJob, source: Any):
    """The safety check of ``source`` (a stage's response, or preview pixels)."""
    return handles[SAFETY_NAME].run.remote(job, source)


def wake_later_stages(plan: GenerationPlan, handles: dict[str, Any], on_demand: Collection[str]) -> None:
    """Ask each later stage's deployment that may be at zero replicas (``on_demand``) for
    ``ready`` now, so that Serve starts its replica while the earlier stages work: a cold
    SDXL -> refiner chain (or generate -> upscale) then waits for one replica start, not one
    after the other. Nothing waits for these calls; they answer once a replica is up."""
    for name in dict.fromkeys(plan.deployments[1:]):
        if name in on_demand:
            handles[name].ready.remote()


def replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says a replica died under the request: Ray's actor death or
    unavailability (``RayActorError``, ``ActorDiedError``, ``ActorUnavailableError``), or
    ``UpstreamLost`` from the stage after the one lost; looked for in the errors Ray and
    Serve wrap it in. Only this is run again: a client's error, a timeout, a cancellation,
    back-pressure or a server fault would end the same way twice."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    for _ in range(8):  # RayTaskError keeps the original as ``cause``; Serve as __cause__
        if isinstance(exc, (RayActorError, ActorUnavailableError, UpstreamLost)):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
        if exc is None:
            return False
    return False


def _log_retry(plan: GenerationPlan, exc: BaseException, when: str = "") -> None:
    logger.warning("a replica was lost during a request for %s (%s%s); running the request "
                   "again, once, with the same seeds", plan.model, type(exc).__name__, when)


async def run_plan(plan: GenerationPlan, handles: dict[str, Any], timeout_s: float | None = None,
                   on_demand: Collection[str] = ()):
    """Call each stage's deployment, chaining responses, then the safety checker on the
    last stage's response when the plan has a check; return the last result. Later stages
    that may be at zero replicas (``on_demand``) are woken at once (:func:`wake_later_stages`).

    A run lost to a dead replica (:func:`replica_lost`) runs again from the first stage,
    once, within the same ``timeout_s``: every job carries its seeds, so the run again makes
    the same images. From the first stage, not the lost one: a lost stage shows as the next
    stage's failure (``UpstreamLost``), which does not say which earlier result is gone, and
    finding out would mean probing each stage's result; a loss costs the earlier stages once
    more instead.

    If the caller goes away (client disconnect) or ``timeout_s`` passes, every stage's
    request is cancelled, so replicas stop work nobody will read (raises TimeoutError on
    timeout).
    """
    first = plan.stages[0]
    inputs = await asyncio.to_thread(_sized_inputs, first) if first.inputs else ()

    async def once(responses: list):
        responses.append(handles[first.deployment].run.remote(first.job, *inputs))
        wake_later_stages(plan, handles, on_demand)
        for stage in plan.stages[1:]:
            responses.append(handles[stage.deployment].run.remote(
                stage.job, await _upstream(responses[-1])))
        if plan.safety is not None:
            responses.append(_check(handles, plan.safety, await _upstream(responses[-1])))
        return await responses[-1]

    async def at_most_twice():
        for again in (False, True):
            responses: list = []
            try:
                return await once(responses)
            except BaseException as exc:
                for response in responses:
                    response.cancel()
                if again or not replica_lost(exc):
                    raise
                _log_retry(plan, exc)

    return await asyncio.wait_for(at_most_twice(), timeout_s)


async def stream_plan(plan: GenerationPlan, handles: dict[str, Any],
                      timeout_s: float | None = None,
                      on_demand: Collection[str] = ()) -> AsyncIterator[tuple]:
    """Run a one-stage plan through a streaming handle: ``("partial", index, pixels)``
    previews (checked, and blurred where flagged, when the plan checks previews), then
    ``("final", result)`` with the plan's safety check applied. Past ``timeout_s`` it
    raises TimeoutError; the replica's work is cancelled whenever the stream ends early.

    A stream lost to a dead replica before its final event runs again, once, within the same
    ``timeout_s``: the same seeds make the same previews, so the run again skips those the
    caller has had and the caller sees each preview once, in order, then the image. A loss
    after the final event ends the stream as it is.

    Each event is awaited under the deadline on its own (``timeout_at``), not under one
    timeout around the whole generator: the caller may await each event in a task of its
    own (:class:`Executor` does), and a timeout cancels the task that entered it.
    """
    stage = plan.stages[0]
    inputs = await asyncio.to_thread(_sized_inputs, stage) if stage.inputs else ()
    deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
    sent = 0  # previews the caller has had
    for again in (False, True):
        events = handles[stage.deployment].options(stream=True).stream.remote(
            stage.job, *inputs, partial_images=plan.partial_images)
        wake_later_stages(plan, handles, on_demand)  # the checker, when it may be at zero
        finished = False
        try:
            while True:
                async with asyncio.timeout_at(deadline):
                    try:
                        kind, *rest = await anext(events)
                    except StopAsyncIteration:
                        return
                    if kind == "partial":
                        index, pixels = rest
                        if index < sent:
                            continue  # sent before the loss: the run again made the same
                        if plan.check_previews:
                            pixels = (await _check(handles, SafetyJob(blur=True), pixels)).output
                        event = ("partial", index, pixels)
                    else:
                        result = rest[0]
                        if plan.safety is not None:
                            result = await _check(handles, plan.safety, result)
                        event = ("final", result)
                yield event
                if kind == "partial":
                    sent = index + 1
                else:
                    finished = True
        except BaseException as exc:
            events.cancel()
            if finished and replica_lost(exc):
                return  # the caller has the image: the end of the stream was all that was lost
            if again or finished or not replica_lost(exc):
                raise
            _log_retry(plan, exc, f", after {sent} of {plan.partial_images} previews")


T = TypeVar("T")

# While a request waits, how often it looks whether a deployment it needs cannot start.
START_WATCH_FIRST_S, START_WATCH_EVERY_S = 1.0, 2.0
# How long a read of the start failures (Serve's controller) may take: one that has not
# answered by then (the controller restarting) is given up and a fresh one is started.
START_READ_LIMIT_S = 10.0


class StartFailureReads:
    """Reads of ``start_failures`` shared by the requests that wait at the same time: one read
    in flight at a time for them all, however many wait, given up (cancelled, freeing
    whatever it holds) once older than :data:`START_READ_LIMIT_S`. A request stops waiting
    for it as soon as its own work ends (:func:`unless_start_fails`); the read goes on for
    the others."""

    def __init__(self, read: Callable[[], Awaitable[dict[str, str]]]):
        self.read = read
        self._task: asyncio.Task | None = None
        self._started = 0.0

    def __call__(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            if loop.time() - self._started < START_READ_LIMIT_S:
                return task
            logger.warning("Serve's status did not answer within %g s; reading it again",
                           START_READ_LIMIT_S)
            task.cancel()
        self._task, self._started = asyncio.ensure_future(self.read()), loop.time()
        # Read by whoever waits; a read nobody waits for any more must not log its error.
        self._task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return self._task


async def unless_start_fails(work: Awaitable[T], deployments: tuple[str, ...],
                             start_failures: Callable[[], Awaitable[dict[str, str]]] | None,
                             retry_after_s: int) -> T:
    """Await ``work``; if one of ``deployments`` cannot start a replica meanwhile, cancel
    it and raise :class:`ModelUnavailableError` (a load that fails for the server's
    reasons, such as weights missing on the server, is the server's fault).

    The work and the read of ``start_failures`` are awaited together: the work's end
    returns at once, never after the read (which waits on Serve's controller, and blocks
    while the head restarts). A read is awaited at most :data:`START_READ_LIMIT_S`, then
    given up; the read is left to others waiting on it (:class:`StartFailureReads`) or
    cancelled when it was this request's own."""
    if start_failures is None:
        return await work
    reads = start_failures if isinstance(start_failures, StartFailureReads) else StartFailureReads(start_failures)
    task = asyncio.ensure_future(work)
    wait_s = START_WATCH_FIRST_S
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=wait_s)
            if done:
                return task.result()
            wait_s = START_WATCH_EVERY_S
            read = reads()
            done, _ = await asyncio.wait({task, read}, timeout=START_READ_LIMIT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if read not in done or read.cancelled():
                continue  # no answer in time: the next turn reads afresh
            if read.exception() is not None:
                logger.warning("could not read which deployments fail to start: %r", read.exception())
                continue
            failures = read.result()
            failed = next((name for name in deployments if name in failures), None)
            if failed is not None:
                what = "The safety checker" if failed == SAFETY_NAME else f"The model '{failed}'"
                raise ModelUnavailableError(what, failures[failed], retry_after_s)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if reads is not start_failures and reads._task is not None:
            reads._task.cancel()  # this request's own read: nobody else waits for it


class Executor:
    """Runs plans on this ingress's handles: every stage within the request timeout, and
    given up with a 503 as soon as a deployment the plan needs cannot start a replica
    (``start_failures`` answers ``{deployment: cause}``; None watches nothing)."""

    def __init__(self, handles: dict[str, Any], timeout_s: float | None, on_demand: Collection[str] = (),
                 start_failures: Callable[[], Awaitable[dict[str, str]]] | None = None,
                 retry_after_s: int = 5):
        self.handles, self.timeout_s, self.on_demand = handles, timeout_s, on_demand
        # One read of the start failures at a time, for every request this ingress runs.
        self.start_failures = StartFailureReads(start_failures) if start_failures is not None else None
        self.retry_after_s = retry_after_s

    def _watched(self, work: Awaitable[T], plan: GenerationPlan) -> Awaitable[T]:
        return unless_start_fails(work, plan.deployments, self.start_failures, self.retry_after_s)

    async def execute(self, plan: GenerationPlan):
        """:func:`run_plan`, watched; raises TimeoutError past the timeout."""
        return await self._watched(run_plan(plan, self.handles, self.timeout_s, self.on_demand), plan)

    async def stream(self, plan: GenerationPlan) -> AsyncIterator[tuple]:
        """:func:`stream_plan`'s events, each awaited watched; closing this closes it."""
        async with contextlib.aclosing(
                stream_plan(plan, self.handles, self.timeout_s, self.on_demand)) as events:
            while True:
                try:
                    event = await self._watched(anext(events), plan)
                except StopAsyncIteration:
                    return
                yield event
