"""Fake deployment handles for unit tests: record calls, return canned results."""

from __future__ import annotations

import asyncio

import numpy as np

from deployments.contract import Upstream


def replica_lost(exc) -> bool:
    from ray.exceptions import ActorUnavailableError, RayActorError

    from deployments.errors import UpstreamLost

    return isinstance(exc, (RayActorError, ActorUnavailableError, UpstreamLost))


class FakeResponse:
    """Stands in for a DeploymentResponse: awaitable, and passed along unresolved. Its
    ``error`` is the handle's next planned failure (``FakeHandle.failures``), else its
    ``error``."""

    def __init__(self, handle, method, args, error=None):
        self.handle, self.method, self.args = handle, method, args
        self.error = error
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
            self._resolve_inputs()
            if self.error is not None:
                raise self.error
            return self.handle.result_for(self)

        return resolve().__await__()

    def _resolve_inputs(self):
        """As ``deployments.contract.resolve_inputs`` in a replica: an input whose replica
        was lost ends this stage with UpstreamLost; another failed input's error travels on."""
        from deployments.errors import UpstreamLost

        for item in self.args[1:]:
            upstream = item.ref if isinstance(item, Upstream) else None
            if isinstance(upstream, FakeResponse) and upstream.error is not None:
                if replica_lost(upstream.error):
                    raise UpstreamLost(type(upstream.error).__name__)
                raise upstream.error


class FakeStream:
    """Stands in for a streaming DeploymentResponseGenerator: ``partial_images`` previews
    (gray level ``first seed + 1 + index``), then the final images, as a model replica's
    ``stream`` yields them; ``fail`` = (events, error) raises ``error`` after that many."""

    def __init__(self, handle, args, partial_images, fail=None):
        self.handle, self.method, self.args = handle, "stream", args
        self.partial_images, self.fail = partial_images, fail
        self.cancelled, self.sent = False, 0

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.handle.delay_s:
            await asyncio.sleep(self.handle.delay_s)
        if self.fail is not None and self.sent == self.fail[0]:
            raise self.fail[1]
        index, self.sent = self.sent, self.sent + 1
        if index < self.partial_images:
            job = self.args[0]
            return ("partial", index, np.full((job.height, job.width, 3), (job.seeds[0] + 1 + index) % 256, np.uint8))
        if index == self.partial_images:
            return ("final", self.handle.result_for(self))
        raise StopAsyncIteration


class _Method:
    def __init__(self, handle, name, stream=False):
        self.handle, self.name, self.streaming = handle, name, stream

    def remote(self, *args, partial_images=0):
        planned = self.handle.failures and self.name in ("run", "stream")  # not `ready`
        failure = self.handle.failures.pop(0) if planned else None
        if self.streaming:
            response = FakeStream(self.handle, args, partial_images, failure)
        else:
            response = FakeResponse(self.handle, self.name, args,
                                    failure if failure is not None else self.handle.error)
        self.handle.calls.append(response)
        return response


class _Streaming:
    def __init__(self, handle):
        self.handle = handle

    def __getattr__(self, method):
        return _Method(self.handle, method, stream=True)


class FakeHandle:
    """``failures``: what each ``run`` or ``stream`` call in turn does, then every later
    call works (or raises ``error``): None works, an exception is raised when the call is
    awaited; a streamed call takes (events, exception): it raises after that many events."""

    def __init__(self, name, error=None, shape_override=None, delay_s=0.0, failures=()):
        self.name, self.error, self.shape_override = name, error, shape_override
        self.delay_s = delay_s
        self.failures = list(failures)
        self.calls: list[FakeResponse | FakeStream] = []

    def __getattr__(self, method):
        return _Method(self, method)

    def options(self, stream=False, **_):
        """DeploymentHandle.options: ``stream=True`` gives a streaming handle."""
        return _Streaming(self) if stream else self

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
        from deployments.contract import StageResult

        if self.shape_override is not None:
            return StageResult(np.zeros(self.shape_override, dtype=np.uint8), seeds=tuple(job.seeds))
        # A distinct gray level per seed, so tests can tell images apart; the seeds used
        # reported as a replica reports them.
        return StageResult(np.stack([np.full((height, width, 3), seed % 256, np.uint8)
                                     for seed in job.seeds])[:n], seeds=tuple(job.seeds))


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
        from deployments.contract import StageResult, unwrap

        job, upstream = response.args
        if isinstance(upstream, Upstream):
            upstream = upstream.ref
        images, earlier = unwrap(upstream.handle.result_for(upstream)
                                 if isinstance(upstream, FakeResponse) else upstream)
        flags = tuple(i in self.flagged for i in range(len(images)))
        if job.blur:
            images = np.stack([np.full_like(img, 128) if flag else img for img, flag in zip(images, flags)])
        return StageResult(images, steps=0, seconds=self.seconds, nsfw=flags).plus(earlier)


class EchoDeployment:
    """A stand-in deployment class for ModelHost's test: keeps its spec, answers ready."""

    def __init__(self, spec):
        self.spec = spec

    def ready(self):
        return self.spec["name"]

    def check_health(self):
        return None
