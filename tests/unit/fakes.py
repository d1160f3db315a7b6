"""Fake deployment handles for unit tests: record calls, return canned results."""

from __future__ import annotations

import asyncio

import numpy as np

from deployments.contract import Upstream


class FakeResponse:
    """Stands in for a DeploymentResponse: awaitable, and passed along unresolved."""

    def __init__(self, handle, method, args):
        self.handle, self.method, self.args = handle, method, args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    async def _to_object_ref(self):
        """DeploymentResponse._to_object_ref: here the response stands for its own ref."""
        return self

    def __await__(self):
        async def resolve():
            if self.handle.delay_s:
                await asyncio.sleep(self.handle.delay_s)
            if self.handle.error is not None:
                raise self.handle.error
            return self.handle.result_for(self)

        return resolve().__await__()


class _Method:
    def __init__(self, handle, name):
        self.handle, self.name = handle, name

    def remote(self, *args):
        response = FakeResponse(self.handle, self.name, args)
        self.handle.calls.append(response)
        return response


class FakeHandle:
    def __init__(self, name, error=None, shape_override=None, delay_s=0.0):
        self.name, self.error, self.shape_override = name, error, shape_override
        self.delay_s = delay_s
        self.calls: list[FakeResponse] = []

    def __getattr__(self, method):
        return _Method(self, method)

    def result_for(self, response):
        job = response.args[0]
        n = len(job.seeds)
        # Refine and upscale calls carry no size: take it from the first job of the chain
        # (or from an uploaded image).
        source = response
        while not hasattr(source.args[0], "height"):
            upstream = source.args[1]
            if isinstance(upstream, Upstream):
                upstream = upstream.ref
            if not isinstance(upstream, FakeResponse):
                height, width = upstream.shape[:2]
                break
            source = upstream
        else:
            height, width = source.args[0].height, source.args[0].width
        if self.shape_override is not None:
            return np.zeros(self.shape_override, dtype=np.uint8)
        # A distinct gray level per seed, so tests can tell images apart.
        return np.stack([np.full((height, width, 3), seed % 256, np.uint8) for seed in job.seeds])[:n]


def fake_handles(config, **overrides):
    handles = {m.name: overrides.get(m.name) or FakeHandle(m.name) for m in config.models}
    if config.safety is not None:
        handles["SafetyChecker"] = overrides.get("SafetyChecker") or FakeSafetyHandle()
    return handles


class FakeSafetyHandle(FakeHandle):
    """The safety checker: flags the images at ``flagged`` (indexes), "blurs" a flagged
    image to gray 128 when the job asks, and reports ``seconds`` of work."""

    def __init__(self, flagged=(), seconds=0.25):
        super().__init__("SafetyChecker")
        self.flagged, self.seconds = set(flagged), seconds

    def result_for(self, response):
        from deployments.contract import StageResult

        job, upstream = response.args
        if isinstance(upstream, Upstream):
            upstream = upstream.ref
        images = upstream.handle.result_for(upstream) if isinstance(upstream, FakeResponse) else upstream
        flags = tuple(i in self.flagged for i in range(len(images)))
        if job.blur:
            images = np.stack([np.full_like(img, 128) if flag else img for img, flag in zip(images, flags)])
        return StageResult(images, steps=0, seconds=self.seconds, nsfw=flags)


class EchoDeployment:
    """A stand-in deployment class for ModelHost's test: keeps its spec, answers ready."""

    def __init__(self, spec):
        self.spec = spec

    def ready(self):
        return self.spec["name"]

    def check_health(self):
        return None
