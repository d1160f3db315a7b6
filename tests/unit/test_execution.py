"""Running plans (serve_app/service/execution.py) with fake handles: a stage lost to a dead
replica runs again once, within the request's timeout, and nothing else is retried; a
finished request never waits for the read of Serve's status; a stream keeps its timeout."""

import asyncio
import base64
import dataclasses
import io
import json
import logging
import time

import numpy as np
import pytest
from PIL import Image
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from deployments.errors import InvalidJobError, ServerFaultError, UpstreamLost
from serve_app.config import load_app_config
from serve_app.fronts.openai import ImageGenerationRequest
from serve_app.service import execution
from serve_app.service.encoding import ResultShapeError
from serve_app.protocol.errors import ModelUnavailableError, ServiceUnavailableError, error_from_exception
from serve_app.service.execution import Executor, run_plan, stream_plan
from serve_app.service.images import ImagesService
from serve_app.service.planning import plan_request
from tests.unit.fakes import FakeHandle, FakeSafetyHandle, fake_handles

SD, XL, REFINER, ESRGAN = "stable-diffusion-2-1", "stable-diffusion-xl", "stable-diffusion-xl-refiner", "esrgan-x2"


def lost():
    """The ways Ray and the deployments say a replica died under a request."""
    return [ActorDiedError(), ActorUnavailableError("the replica is unreachable", b"\0" * 16),
            RayActorError(), UpstreamLost("ActorDiedError")]


@pytest.fixture
def config(tiny_args):
    """The tiny app without its safety checker."""
    return load_app_config({key: value for key, value in tiny_args.items() if key != "safety"})


@pytest.fixture
def checked(tiny_args):
    """The tiny app with its safety checker (policy blur)."""
    return load_app_config(tiny_args)


@pytest.fixture
def warnings(caplog):
    """Warnings of Serve's logger (which Ray may keep from propagating to the root)."""
    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        yield caplog
    logger.removeHandler(caplog.handler)


def req(**fields):
    return ImageGenerationRequest(**{"prompt": "a cat", "size": "256x256", **fields}).to_request()


def runs(handle):
    return [call for call in handle.calls if call.method in ("run", "stream")]


def gray(b64: str) -> int:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").getpixel((3, 3))[0]


@pytest.mark.parametrize("loss", lost(), ids=lambda e: type(e).__name__)
def test_a_stage_lost_to_a_dead_replica_runs_again_once_and_the_request_succeeds(config, loss, warnings):
    handles = fake_handles(config, **{SD: FakeHandle(SD, failures=[loss])})
    response = asyncio.run(ImagesService(config, handles).generate(req(seed=7, n=2)))
    assert [item.seed for item in response.data] == [7, 8]
    assert [gray(item.b64_json) for item in response.data] == [7, 8]
    first, again = runs(handles[SD])
    assert again.args == first.args  # the same job, the same seeds: the same images
    assert first.cancelled and not again.cancelled
    (line,) = [r for r in warnings.records if "running the request again" in r.getMessage()]
    assert line.levelno == logging.WARNING and type(loss).__name__ in line.getMessage()


class ReportingHandle(FakeHandle):
    """A replica that reports ``seeds`` as the seeds it used, whatever the job said."""

    def __init__(self, name, seeds):
        super().__init__(name)
        self.seeds = seeds

    def result_for(self, response):
        return dataclasses.replace(super().result_for(response), seeds=self.seeds)


def test_images_are_labelled_with_the_seeds_the_replica_reports(config):
    handles = fake_handles(config, **{SD: ReportingHandle(SD, (70, 71))})
    response = asyncio.run(ImagesService(config, handles).generate(req(seed=7, n=2)))
    assert [item.seed for item in response.data] == [70, 71]
    # A replica that reports no seed for an image: the server's fault, never a guessed label.
    handles = fake_handles(config, **{SD: ReportingHandle(SD, (70,))})
    with pytest.raises(ResultShapeError):
        asyncio.run(ImagesService(config, handles).generate(req(seed=7, n=2)))


def test_a_second_loss_is_a_503_after_two_calls_not_three(config):
    handles = fake_handles(config, **{SD: FakeHandle(SD, failures=[ActorDiedError(), ActorDiedError()])})
    with pytest.raises(ActorDiedError) as info:
        asyncio.run(ImagesService(config, handles).generate(req()))
    error = error_from_exception(info.value)  # as the fronts answer it
    assert (type(error), error.status_code, error.code) == (ServiceUnavailableError, 503, "overloaded")
    assert len(runs(handles[SD])) == 2
    assert all(call.cancelled for call in runs(handles[SD]))


def test_a_refiner_lost_in_a_chain_runs_the_chain_again(config):
    handles = fake_handles(config, **{REFINER: FakeHandle(REFINER, failures=[ActorDiedError()])})
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner", size="1024x1024", seed=3), config)
    images = asyncio.run(run_plan(plan, handles)).output
    assert images.shape == (1, 1024, 1024, 3) and images[0, 0, 0, 0] == 3
    bases, refines = runs(handles[XL]), runs(handles[REFINER])
    assert len(bases) == len(refines) == 2
    # Each run of the chain hands its own base's result to its own refiner.
    assert [refine.args[1].ref for refine in refines] == bases


def test_a_base_lost_under_its_refiner_runs_the_chain_again(config):
    # The refiner's replica finds its input lost (UpstreamLost, as resolve_inputs raises).
    handles = fake_handles(config, **{XL: FakeHandle(XL, failures=[ActorDiedError()])})
    plan = plan_request(req(model="stable-diffusion-xl-with-refiner", size="1024x1024", seed=3), config)
    assert asyncio.run(run_plan(plan, handles)).output.shape == (1, 1024, 1024, 3)
    assert len(runs(handles[XL])) == len(runs(handles[REFINER])) == 2


def test_a_safety_checker_lost_after_generate_then_upscale_runs_the_plan_again(checked):
    handles = fake_handles(checked, SafetyChecker=FakeSafetyHandle(flagged=(0,)))
    handles["SafetyChecker"].failures = [ActorDiedError()]
    plan = plan_request(req(size="256x256", upscale=ESRGAN, seed=5), checked)
    result = asyncio.run(run_plan(plan, handles))
    assert result.nsfw == (True,)
    assert len(runs(handles[SD])) == len(runs(handles[ESRGAN])) == len(runs(handles["SafetyChecker"])) == 2


@pytest.mark.parametrize("error,status", [
    (InvalidJobError("the image is too small", param="image"), 400),
    (ServerFaultError("a library clash"), 500),
    (RuntimeError("a bug"), 500),
], ids=["client", "server-fault", "unexpected"])
def test_errors_that_are_not_a_lost_replica_are_not_retried(config, error, status):
    handles = fake_handles(config, **{SD: FakeHandle(SD, failures=[error])})
    with pytest.raises(Exception) as info:
        asyncio.run(ImagesService(config, handles).generate(req()))
    assert error_from_exception(info.value).status_code == status
    assert len(runs(handles[SD])) == 1


def test_back_pressure_is_not_retried(config):
    from ray.serve.exceptions import BackPressureError

    handles = fake_handles(config, **{SD: FakeHandle(SD, failures=[BackPressureError(
        num_queued_requests=32, max_queued_requests=32)])})
    with pytest.raises(BackPressureError):
        asyncio.run(ImagesService(config, handles).generate(req()))
    assert len(runs(handles[SD])) == 1


def test_a_timeout_is_not_retried(config):
    handles = fake_handles(config, **{SD: FakeHandle(SD, delay_s=5)})
    plan = plan_request(req(), config)
    with pytest.raises(TimeoutError):
        asyncio.run(run_plan(plan, handles, timeout_s=0.1))
    (call,) = runs(handles[SD])
    assert call.cancelled


def test_the_retry_runs_within_the_same_request_timeout(config):
    # The first call is lost after 0.3 s, the retry would end at 0.6 s: past the 0.45 s.
    handles = fake_handles(config, **{SD: FakeHandle(SD, delay_s=0.3, failures=[ActorDiedError()])})
    plan = plan_request(req(), config)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(run_plan(plan, handles, timeout_s=0.45))
    assert time.monotonic() - started < 0.75  # not 0.3 s more for a fresh timeout
    assert len(runs(handles[SD])) == 2 and all(call.cancelled for call in runs(handles[SD]))


def test_a_cancelled_request_is_not_retried(config):
    handles = fake_handles(config, **{SD: FakeHandle(SD, delay_s=5)})
    plan = plan_request(req(), config)

    async def cancel_soon():
        task = asyncio.ensure_future(run_plan(plan, handles))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    (call,) = runs(handles[SD])
    assert call.cancelled


# --- streams ----------------------------------------------------------------------------


def stream_events(service, request):
    async def collect():
        stream = await service.execute(await service.plan(request))
        return [json.loads(chunk.split("data: ", 1)[1]) async for chunk in stream]

    return asyncio.run(collect())


def previews(events):
    return [(e["partial_image_index"], gray(e["b64_json"])) for e in events
            if e["type"] == "image_generation.partial_image"]


STREAM = dict(stream=True, partial_images=2, seed=20)


def test_a_stream_lost_before_its_first_event_runs_again(config):
    undisturbed = stream_events(ImagesService(config, fake_handles(config)), req(**STREAM))
    handles = fake_handles(config, **{SD: FakeHandle(SD, failures=[(0, ActorDiedError())])})
    events = stream_events(ImagesService(config, handles), req(**STREAM))
    assert [e["type"] for e in events] == [e["type"] for e in undisturbed] == [
        "image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert previews(events) == previews(undisturbed) == [(0, 21), (1, 22)]
    assert events[-1]["b64_json"] == undisturbed[-1]["b64_json"]
    assert len(runs(handles[SD])) == 2


def test_a_stream_lost_after_a_preview_runs_again_and_skips_the_previews_sent(config):
    """The same seeds make the same previews: the run again sends the client only those it
    has not had, so the client sees each preview once, in order, then the image."""
    undisturbed = stream_events(ImagesService(config, fake_handles(config)), req(**STREAM))
    handles = fake_handles(config, **{SD: FakeHandle(SD, failures=[(1, ActorDiedError())])})
    events = stream_events(ImagesService(config, handles), req(**STREAM))
    assert [e["type"] for e in events] == [e["type"] for e in undisturbed]
    assert previews(events) == previews(undisturbed)
    assert events[-1]["b64_json"] == undisturbed[-1]["b64_json"]
    first, again = runs(handles[SD])
    assert (first.sent, again.sent) == (1, 4) and first.cancelled  # again: 2 previews, final, end


def test_a_stream_lost_twice_ends_with_an_error_event_after_two_runs(config):
    handles = fake_handles(config, **{SD: FakeHandle(SD, failures=[(1, ActorDiedError()), (2, ActorDiedError())])})
    events = stream_events(ImagesService(config, handles), req(**STREAM))
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + ["error"]
    assert previews(events) == [(0, 21), (1, 22)]
    assert (events[-1]["error"]["type"], events[-1]["error"]["code"]) == ("server_error", "overloaded")
    assert len(runs(handles[SD])) == 2


def test_a_loss_after_the_final_event_ends_the_stream_as_it_is(config):
    handles = fake_handles(config, **{SD: FakeHandle(SD, failures=[(3, ActorDiedError())])})
    events = stream_events(ImagesService(config, handles), req(**STREAM))
    assert [e["type"] for e in events][-1] == "image_generation.completed"
    assert len(runs(handles[SD])) == 1


def test_a_stream_with_a_client_error_is_not_retried(config):
    handles = fake_handles(config, **{SD: FakeHandle(SD, failures=[(0, InvalidJobError("no", param="image"))])})
    events = stream_events(ImagesService(config, handles), req(**STREAM))
    assert [e["type"] for e in events] == ["error"] and events[0]["error"]["param"] == "image"
    assert len(runs(handles[SD])) == 1


def test_a_checked_stream_whose_checker_is_lost_on_a_preview_runs_again(checked):
    handles = fake_handles(checked)
    handles["SafetyChecker"].failures = [None, ActorDiedError()]  # the second preview's check
    plan = plan_request(req(**STREAM, moderation="auto"), checked)

    async def collect():
        return [event async for event in stream_plan(plan, handles)]

    events = asyncio.run(collect())
    assert [(e[0], e[1] if e[0] == "partial" else None) for e in events] == [
        ("partial", 0), ("partial", 1), ("final", None)]
    assert len(runs(handles[SD])) == 2
    # Preview 0 is not checked twice: the run again skips it before its check.
    assert len(runs(handles["SafetyChecker"])) == 1 + 2 + 1


def test_a_watched_stream_keeps_its_timeout(config):
    """Each event of a watched stream is awaited in a task of its own; the stream's timeout
    still ends it (it did not: the timeout cancelled the first event's task, long done)."""
    handles = fake_handles(config, **{SD: FakeHandle(SD, delay_s=0.2)})
    plan = plan_request(req(stream=True, partial_images=3), config)

    async def no_failures():
        return {}

    executor = Executor(handles, 0.5, start_failures=no_failures)

    async def collect():
        return [event[0] async for event in executor.stream(plan)]

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(collect())
    assert time.monotonic() - started < 0.9  # five events of 0.2 s: 1 s without the timeout


# --- the start-failure watch -------------------------------------------------------------


@pytest.fixture
def quick_watch(monkeypatch):
    monkeypatch.setattr(execution, "START_WATCH_FIRST_S", 0.05)
    monkeypatch.setattr(execution, "START_WATCH_EVERY_S", 0.05)
    monkeypatch.setattr(execution, "START_READ_LIMIT_S", 0.3, raising=False)


def test_a_finished_request_does_not_wait_for_a_blocked_start_failure_read(config, quick_watch):
    """While Serve's controller does not answer (a head restart), a request whose work ends
    returns at once: it waits on its work and the read together."""
    handles = fake_handles(config, **{SD: FakeHandle(SD, delay_s=0.2)})
    reads = []

    async def blocked():
        reads.append(1)
        await asyncio.Event().wait()  # never set: the controller never answers

    service = ImagesService(config, handles, start_failures=blocked)

    async def generate():
        started = time.monotonic()
        response = await asyncio.wait_for(service.generate(req()), 5)
        return response, time.monotonic() - started

    response, took = asyncio.run(generate())
    assert len(response.data) == 1 and reads
    assert took < 1.0, took  # the work's 0.2 s, not the read's never


def test_a_read_past_its_limit_is_given_up_and_the_next_one_finds_the_failure(config, quick_watch):
    """The read is bounded: one that never answers is given up (cancelled, so that a lock
    it holds is freed) and a fresh read answers; a request waiting on a deployment that
    cannot start still gets its 503."""
    handles = fake_handles(config, **{SD: FakeHandle(SD, delay_s=3600)})
    reads, cancelled = [], []

    async def first_blocks():
        reads.append(1)
        if len(reads) == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(1)
                raise
        return {SD: "FileNotFoundError: /models/x"}

    service = ImagesService(config, handles, start_failures=first_blocks)

    async def generate():
        started = time.monotonic()
        with pytest.raises(ModelUnavailableError):
            await asyncio.wait_for(service.generate(req()), 5)
        return time.monotonic() - started

    took = asyncio.run(generate())
    assert len(reads) == 2 and cancelled == [1]
    assert 0.3 <= took < 1.5, took


def test_waiting_requests_share_one_read(config, quick_watch):
    handles = fake_handles(config, **{SD: FakeHandle(SD, delay_s=0.25)})
    reads = []

    async def slow():
        reads.append(1)
        await asyncio.sleep(0.2)
        return {}

    service = ImagesService(config, handles, start_failures=slow)

    async def many():
        return await asyncio.gather(*(service.generate(req(seed=i)) for i in range(6)))

    assert len(asyncio.run(many())) == 6
    assert 1 <= len(reads) <= 3, reads  # not one a request (6 or more)


# --- jobs ------------------------------------------------------------------------------


def test_a_jobs_attempt_is_one_request_whose_lost_stage_ran_again(tiny_args, tmp_path):
    """A job's attempt runs the request once; the run again after a lost replica is inside
    that request, so the job succeeds in its first attempt (the model ran twice)."""
    from celery import Celery

    from serve_app.jobs.runner import JobRunner, JobRetryError
    from serve_app.jobs.store import JobRecord, JobStore, new_job_id
    from serve_app.protocol.keys import owner_of

    store = JobStore(Celery("t", backend=f"file://{tmp_path}").backend)
    config = load_app_config({**tiny_args, "safety": None})
    results = {}
    for name, failures in (("once", [ActorDiedError()]), ("twice", [ActorDiedError(), ActorDiedError()])):
        handles = fake_handles(config, **{SD: FakeHandle(SD, failures=failures)})
        runner = JobRunner(config, ImagesService(config, handles), store, images_store=None)
        job = JobRecord(id=new_job_id(), operation="generations", owner=owner_of(b"sk"),
                        request={"task": "generate", "prompt": "x", "size": "256x256", "seed": 4})
        store.put(job)
        try:
            status = asyncio.run(runner.handle_delivery(job.id))
        except JobRetryError:
            status = "fault"
        results[name] = (status, store.get(job.id).attempts, len(runs(handles[SD])))
    assert results["once"] == ("succeeded", 1, 2)
    # Lost twice: the attempt fails as a fault of the server (the broker's retry is the next
    # attempt), after two calls.
    assert results["twice"] == ("fault", 1, 2)
