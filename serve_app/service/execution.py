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
from typing import Any, AsyncIterator, Awaitable, Callable, Collection, TypeVar


from deployments.contract import ImageToImageJob, SafetyJob, Upstream
from serve_app.config import SAFETY_NAME
from serve_app.service.errors import ModelUnavailableError
from serve_app.service.planning import GenerationPlan, Stage
from serve_app.service.uploads import resize


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


async def run_plan(plan: GenerationPlan, handles: dict[str, Any], timeout_s: float | None = None,
                   on_demand: Collection[str] = ()):
    """Call each stage's deployment, chaining responses, then the safety checker on the
    last stage's response when the plan has a check; return the last result. Later stages
    that may be at zero replicas (``on_demand``) are woken at once (:func:`wake_later_stages`).

    If the caller goes away (client disconnect) or ``timeout_s`` passes, every stage's
    request is cancelled, so replicas stop work nobody will read (raises TimeoutError on
    timeout).
    """
    first = plan.stages[0]
    inputs = await asyncio.to_thread(_sized_inputs, first) if first.inputs else ()
    responses = [handles[first.deployment].run.remote(first.job, *inputs)]
    wake_later_stages(plan, handles, on_demand)

    async def chain():
        for stage in plan.stages[1:]:
            responses.append(handles[stage.deployment].run.remote(
                stage.job, await _upstream(responses[-1])))
        if plan.safety is not None:
            responses.append(_check(handles, plan.safety, await _upstream(responses[-1])))
        return await responses[-1]

    try:
        return await asyncio.wait_for(chain(), timeout_s)
    except BaseException:
        for response in responses:
            response.cancel()
        raise


async def stream_plan(plan: GenerationPlan, handles: dict[str, Any],
                      timeout_s: float | None = None,
                      on_demand: Collection[str] = ()) -> AsyncIterator[tuple]:
    """Run a one-stage plan through a streaming handle: ``("partial", index, pixels)``
    previews (checked, and blurred where flagged, when the plan checks previews), then
    ``("final", result)`` with the plan's safety check applied. Past ``timeout_s`` it
    raises TimeoutError; the replica's work is cancelled whenever the stream ends early."""
    stage = plan.stages[0]
    inputs = await asyncio.to_thread(_sized_inputs, stage) if stage.inputs else ()
    events = handles[stage.deployment].options(stream=True).stream.remote(
        stage.job, *inputs, partial_images=plan.partial_images)
    wake_later_stages(plan, handles, on_demand)  # the checker, when it may be at zero
    try:
        async with asyncio.timeout(timeout_s):
            async for kind, *rest in events:
                if kind == "partial":
                    index, pixels = rest
                    if plan.check_previews:
                        pixels = (await _check(handles, SafetyJob(blur=True), pixels)).output
                    yield ("partial", index, pixels)
                else:
                    result = rest[0]
                    if plan.safety is not None:
                        result = await _check(handles, plan.safety, result)
                    yield ("final", result)
    except BaseException:
        events.cancel()
        raise


T = TypeVar("T")

# While a request waits, how often it looks whether a deployment it needs cannot start.
START_WATCH_FIRST_S, START_WATCH_EVERY_S = 1.0, 2.0


async def unless_start_fails(work: Awaitable[T], deployments: tuple[str, ...],
                             start_failures: Callable[[], Awaitable[dict[str, str]]] | None,
                             retry_after_s: int) -> T:
    """Await ``work``; if one of ``deployments`` cannot start a replica meanwhile, cancel
    it and raise :class:`ModelUnavailableError` (a load that fails for the server's
    reasons, such as weights missing on the server, is the server's fault)."""
    if start_failures is None:
        return await work
    task = asyncio.ensure_future(work)
    wait_s = START_WATCH_FIRST_S
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=wait_s)
            if done:
                return task.result()
            wait_s = START_WATCH_EVERY_S
            failures = await start_failures()
            failed = next((name for name in deployments if name in failures), None)
            if failed is not None:
                what = "The safety checker" if failed == SAFETY_NAME else f"The model '{failed}'"
                raise ModelUnavailableError(what, failures[failed], retry_after_s)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class Executor:
    """Runs plans on this ingress's handles: every stage within the request timeout, and
    given up with a 503 as soon as a deployment the plan needs cannot start a replica
    (``start_failures`` answers ``{deployment: cause}``; None watches nothing)."""

    def __init__(self, handles: dict[str, Any], timeout_s: float | None, on_demand: Collection[str] = (),
                 start_failures: Callable[[], Awaitable[dict[str, str]]] | None = None,
                 retry_after_s: int = 5):
        self.handles, self.timeout_s, self.on_demand = handles, timeout_s, on_demand
        self.start_failures, self.retry_after_s = start_failures, retry_after_s

    def _watched(self, work: Awaitable[T], plan: GenerationPlan) -> Awaitable[T]:
        return unless_start_fails(work, plan.deployments, self.start_failures, self.retry_after_s)

    async def run(self, plan: GenerationPlan):
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
