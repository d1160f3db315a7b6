"""Calls to the image store from the ingress and the jobs consumer (serve_app/service/store.py):
bounded in time, its refusals told as the errors they are, ids checked before any call, and
the owner of a URL image threaded from the route to the store. The store is the real
ImageStoreDeployment behind an in-process handle; a store that never answers is a handle
whose calls never resolve."""

import asyncio
import dataclasses
import io
import pickle
import time

import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request

from deployments.store.image_store import (
    IMAGE,
    INPUT,
    ImageStoreDeployment,
    StoreRefused,
    new_id,
)
from serve_app.config import load_app_config
from serve_app.fronts.openai import ImageGenerationRequest
from serve_app.fronts.shared import answer, request_owner
from serve_app.jobs.runner import JobRunner, JobRetryError
from serve_app.jobs.store import JobRecord, JobStore, new_job_id
from serve_app.protocol.keys import owner_of
from serve_app.protocol.errors import NotFoundError, ServerFaultAPIError
from serve_app.service.images import ImagesService
from serve_app.service.store import ImageStoreClient, StoreQuotaError, StoreUnavailableError
from tests.unit.fakes import fake_handles


class LocalHandle:
    """The store deployment's handle in this process: ``handle.method.remote(...)`` runs the
    deployment's own method; every call is recorded."""

    def __init__(self, deployment):
        self.deployment, self.calls = deployment, []

    def __getattr__(self, name):
        method, calls = getattr(self.deployment, name), self.calls

        class _Method:
            @staticmethod
            def remote(*args):
                calls.append((name, args))
                return method(*args)

        return _Method()


class StalledResponse:
    """A DeploymentResponse from a store replica that never answers (gone, or hung)."""

    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __await__(self):
        return asyncio.Event().wait().__await__()


class StalledHandle:
    def __init__(self):
        self.responses = []

    def __getattr__(self, name):
        responses = self.responses

        class _Method:
            @staticmethod
            def remote(*args):
                responses.append(StalledResponse())
                return responses[-1]

        return _Method()


@pytest.fixture
def tiny_args(tiny_args):
    """The tiny app without its safety checker, every store call bounded at 0.3 s."""
    args = {key: value for key, value in tiny_args.items() if key != "safety"}
    return {**args, "image_store": {**args.get("image_store", {}), "call_timeout_s": 0.3}}


@pytest.fixture
def config(tiny_args):
    return load_app_config(tiny_args)


def store_of(config, **image_store) -> ImageStoreDeployment:
    return ImageStoreDeployment(config.model_copy(update={"image_store": config.image_store.model_copy(
        update=image_store)}).image_store.spec(config.jobs))


def url_request(**fields):
    return ImageGenerationRequest(prompt="a cat", size="256x256", response_format="url",
                                  **fields).to_request()


def test_a_store_that_does_not_answer_is_a_503_of_the_server_not_a_hang(config):
    handle = StalledHandle()
    service = ImagesService(config, fake_handles(config), handle)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        asyncio.run(service.generate(url_request(n=2)))
    assert time.monotonic() - started < 2.0
    error = info.value
    assert (error.status_code, error.error_type, error.code) == (503, "server_error", "store_unavailable")
    assert error.headers["Retry-After"] == str(config.ingress.retry_after_s)
    assert "0.3 s" in error.message and "fault of the server" in error.message
    assert [r.cancelled for r in handle.responses] == [True]  # the call is called off
    with pytest.raises(StoreUnavailableError):  # the files route too
        asyncio.run(service.image_file(new_id()))


def test_the_stores_refusals_are_told_as_what_they_are(config):
    from serve_app.config import StoreQuota

    deployment = store_of(config, max_entries=3, per_key=StoreQuota(max_bytes=1000, max_entries=2))
    client = ImageStoreClient(LocalHandle(deployment), 1.0, retry_after_s=9)

    async def calls():
        await client.put_many([(b"a", "image/png")] * 2, owner="a")
        await client.put(b"b", "image/png", owner="b")
        with pytest.raises(StoreUnavailableError) as full:  # only others' images could make room
            await client.put(b"c", "image/png", owner="c")
        jobs = deployment.store.spec.inputs.per_key.max_entries
        await client.put_many([(b"u", "image/png")] * jobs, owner="a", kind=INPUT)
        with pytest.raises(StoreQuotaError) as over:  # its own queued uploads fill its share
            await client.put(b"u", "image/png", owner="a", kind=INPUT)
        with pytest.raises(ServerFaultAPIError) as too_large:
            await client.put(b"x" * 1001, "image/png", owner="d")  # past one key's share
        return full.value, over.value, too_large.value

    full, over, too_large = asyncio.run(calls())
    assert (full.status_code, full.code, full.headers["Retry-After"]) == (503, "store_full", "9")
    assert "full of other keys' images" in full.message and "fault of the server" in full.message
    assert (over.status_code, over.error_type, over.code) == (429, "insufficient_quota", "store_quota_exceeded")
    assert over.headers["Retry-After"] == "9"
    assert (too_large.status_code, too_large.code) == (500, "store_limit")


def test_a_refusal_that_crossed_ray_is_mapped_too():
    """Ray hands a replica's exception back wrapped, the original as ``cause``."""
    refused = pickle.loads(pickle.dumps(StoreRefused("key_quota", "over")))
    assert (refused.reason, refused.message) == ("key_quota", "over")

    class Wrapped(Exception):
        cause = refused

    class Raising:
        def __getattr__(self, name):
            class _Method:
                @staticmethod
                async def remote(*args):
                    raise Wrapped()
            return _Method()

    with pytest.raises(StoreQuotaError):
        asyncio.run(ImageStoreClient(Raising(), 1.0, 5).put(b"x", "image/png", "a", INPUT))


def test_the_files_route_never_asks_the_store_for_what_is_not_an_id(config):
    handle = LocalHandle(store_of(config))
    service = ImagesService(config, fake_handles(config), handle)
    for bad in ("x", "../../etc/passwd", "a" * 43 + ".json", "A" * 44, "%2e%2e" + "a" * 37):
        with pytest.raises(NotFoundError):
            asyncio.run(service.image_file(bad))
    assert handle.calls == []
    with pytest.raises(NotFoundError):
        asyncio.run(service.image_file(new_id()))
    assert [name for name, _ in handle.calls] == ["get"]


def test_url_images_belong_to_the_key_that_asked_for_them(config):
    deployment = store_of(config)
    service = ImagesService(config, fake_handles(config), LocalHandle(deployment))
    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "query_string": b"",
             "headers": [(b"authorization", b"Bearer sk-one"), (b"host", b"h")],
             "server": ("h", 80), "scheme": "http", "root_path": ""}
    request = Request(scope)
    assert request_owner(request) == owner_of(b"sk-one")
    response = asyncio.run(answer(request, service, service.plan(url_request(n=3))))
    assert all(item.url.startswith("http://h/v1/images/files/") for item in response.data)
    store = deployment.store
    assert store.usage(IMAGE, owner_of(b"sk-one"))[1] == 3 and store.usage(IMAGE, "")[1] == 0
    anonymous = Request({**scope, "headers": [(b"host", b"h")]})
    asyncio.run(answer(anonymous, service, service.plan(url_request())))
    assert store.usage(IMAGE, "")[1] == 1


# --- the jobs consumer ---------------------------------------------------------------------


@pytest.fixture
def jobs_store(tmp_path):
    from celery import Celery

    return JobStore(Celery("t", backend=f"file://{tmp_path}").backend)


def png(side=32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def upscale_job(inputs, owner=owner_of(b"sk-one")) -> JobRecord:
    from serve_app.fronts.openai import UpscaleForm

    request = UpscaleForm.model_construct(model="esrgan-x2", response_format="url", n=1,
                                          output_format="png", moderation="auto").to_request()
    return JobRecord(id=new_job_id(), operation="upscale", owner=owner,
                     request={**dataclasses.asdict(request), "_base_url": "http://h"}, inputs=inputs)


def runner(config, jobs_store, handle):
    return JobRunner(config, ImagesService(config, fake_handles(config), handle), jobs_store, handle)


def test_a_job_runs_from_its_upload_its_images_are_its_owners_and_its_upload_goes_when_it_ends(
        config, jobs_store):
    deployment = store_of(config)
    owner = owner_of(b"sk-one")
    upload = deployment.store.put(png(), "image/png", owner, INPUT)
    job = upscale_job({"image": upload}, owner)
    jobs_store.put(job)
    job_runner = runner(config, jobs_store, LocalHandle(deployment))
    assert asyncio.run(job_runner.handle_delivery(job.id)) == "succeeded"
    assert deployment.store.get(upload, INPUT) is None  # deleted with the job's end
    assert deployment.store.usage(INPUT) == (0, 0)
    assert deployment.store.usage(IMAGE, owner)[1] == 1  # its result, the owner's


def test_a_job_whose_upload_is_gone_fails_once_and_is_not_retried(config, jobs_store):
    job = upscale_job({"image": new_id()})
    jobs_store.put(job)
    status = asyncio.run(runner(config, jobs_store, LocalHandle(store_of(config))).handle_delivery(job.id))
    assert status == "failed"  # no JobRetryError: the broker does not retry it
    error = jobs_store.get(job.id).error
    assert (error["type"], error["code"], error["param"]) == ("server_error", "input_gone", "image")
    assert "no longer in the server's image store" in error["message"]


def test_a_store_that_does_not_answer_a_job_is_a_server_fault_retried_later(config, jobs_store):
    job = upscale_job({"image": new_id()})
    jobs_store.put(job)
    started = time.monotonic()
    with pytest.raises(JobRetryError):
        asyncio.run(runner(config, jobs_store, StalledHandle()).handle_delivery(job.id, retries=0))
    assert time.monotonic() - started < 3.0
    record = jobs_store.get(job.id)
    assert record.status == "queued" and record.error["code"] == "store_unavailable"
