"""Reading Serve's status for ``GET /health`` and the start-failure watch
(serve_app/service/health.py): cached, one read in flight, bounded in time, and a controller
that does not answer never pins more than one thread. The reads here are fakes of
``serve.status()``: one that counts, one that blocks until released, one that fails."""

import asyncio
import threading
import time

import pytest

from serve_app.service.health import (
    DeploymentState,
    StartFailureWatch,
    StatusCache,
    StatusSnapshot,
    health_answer,
)

FAILED = DeploymentState("DEPLOY_FAILED", 0, "REPLICA_STARTUP_FAILED",
                         "Error:\nFileNotFoundError: [Errno 2] No such file: '/models/x2.pth'")
HEALTHY = {"ImagesIngress": DeploymentState("HEALTHY", 1), "sd": DeploymentState("HEALTHY", 1)}


class Read:
    """A fake ``serve.status()`` read: counts calls and the threads in it at once; blocks while
    ``gate`` is clear; raises ``error`` if set."""

    def __init__(self, answer=None, blocked=False):
        self.answer = HEALTHY if answer is None else answer
        self.calls, self.inside, self.most_inside = 0, 0, 0
        self.gate = threading.Event()
        if not blocked:
            self.gate.set()
        self.error = None
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            self.gate.wait(10)
            if self.error is not None:
                raise self.error
            return self.answer
        finally:
            with self._lock:
                self.inside -= 1


def test_concurrent_probes_share_one_read_and_the_answer_is_kept_for_its_max_age():
    read = Read()
    cache = StatusCache(read, max_age_s=60, timeout_s=5)

    async def probes():
        first = await asyncio.gather(*(cache.get() for _ in range(50)))
        again = await cache.get()
        return first, again

    first, again = asyncio.run(probes())
    assert read.calls == 1
    assert all(snapshot == StatusSnapshot(HEALTHY, True) for snapshot in [*first, again])


def test_a_read_older_than_the_max_age_is_read_again():
    read, now = Read(), [100.0]
    cache = StatusCache(read, max_age_s=2, timeout_s=5, clock=lambda: now[0])

    async def probes():
        await cache.get()
        now[0] += 1.9
        await cache.get()
        now[0] += 0.2
        await cache.get()

    asyncio.run(probes())
    assert read.calls == 2


def test_a_controller_that_does_not_answer_pins_one_thread_and_probes_answer_in_time():
    read = Read(blocked=True)
    cache = StatusCache(read, max_age_s=0.01, timeout_s=0.3)

    async def probes():
        started = time.monotonic()
        waited = await asyncio.gather(*(cache.get() for _ in range(20)))
        first_wait = time.monotonic() - started
        started = time.monotonic()
        later = [await cache.get() for _ in range(50)]  # the read is still hung
        later_wait = time.monotonic() - started
        read.gate.set()  # the controller is back
        for _ in range(100):
            await asyncio.sleep(0.02)
            if (await cache.get()).fresh:
                break
        return waited, first_wait, later, later_wait, await cache.get()

    waited, first_wait, later, later_wait, back = asyncio.run(probes())
    assert 0.25 < first_wait < 1.0 and later_wait < 0.2  # bounded; later ones do not wait
    assert all(snapshot == StatusSnapshot(None, False) for snapshot in [*waited, *later])
    assert read.most_inside == 1 and read.calls <= 2  # one read in flight, never one per probe
    assert back == StatusSnapshot(HEALTHY, True)


def test_a_failed_read_keeps_the_last_answer_marked_stale():
    read, now = Read(), [0.0]
    cache = StatusCache(read, max_age_s=1, timeout_s=5, clock=lambda: now[0])

    async def probes():
        fresh = await cache.get()
        read.error, now[0] = RuntimeError("controller gone"), 5.0
        return fresh, await cache.get()

    fresh, failed = asyncio.run(probes())
    assert fresh == StatusSnapshot(HEALTHY, True) and failed == StatusSnapshot(HEALTHY, False)


def test_the_start_failure_watch_keeps_its_last_answer_when_the_controller_hangs():
    read = Read({"esrgan-x2": FAILED})
    watch = StartFailureWatch(StatusCache(read, max_age_s=0.01, timeout_s=0.2))

    async def asks():
        first = await watch()
        read.gate.clear()  # the next read hangs
        await asyncio.sleep(0.05)
        started = time.monotonic()
        during = await asyncio.gather(*(watch() for _ in range(10)))
        waited = time.monotonic() - started
        read.gate.set()
        return first, during, waited

    first, during, waited = asyncio.run(asks())
    assert first == {"esrgan-x2": "FileNotFoundError: [Errno 2] No such file: '/models/x2.pth'"}
    assert all(answer == first for answer in during) and waited < 1.0
    assert read.most_inside == 1


def test_the_watch_still_takes_a_plain_read():
    read = Read({"esrgan-x2": FAILED})
    watch = StartFailureWatch(read, max_age_s=60)

    async def many():
        return await asyncio.gather(*(watch() for _ in range(20)))

    assert all("esrgan-x2" in answer for answer in asyncio.run(many())) and read.calls == 1


@pytest.mark.parametrize("detailed", [True, False])
def test_health_answers(detailed):
    failing = {**HEALTHY, "esrgan-x2": FAILED}
    assert health_answer(StatusSnapshot(HEALTHY, True), detailed) == (200, {"status": "ok", **(
        {"deployments": {"ImagesIngress": "HEALTHY", "sd": "HEALTHY"}, "failures": {}} if detailed else {})})
    code, body = health_answer(StatusSnapshot(failing, True), detailed)
    assert code == 503 and body["status"] == "starting"
    # The cause names a file path on the server: only for a caller with a key (or keys off).
    assert ("failures" in body) == detailed and ("/models/x2.pth" in str(body)) == detailed
    # Serve's controller did not answer: the status is unknown, the last one is not claimed.
    for snapshot in (StatusSnapshot(HEALTHY, False), StatusSnapshot(None, False)):
        assert health_answer(snapshot, detailed) == (503, {"status": "unknown"})


def test_the_health_route_takes_only_the_authorization_header_once_shipped_to_a_replica():
    """The route takes no query or body parameter, also once pickled as Serve pickles what it
    ships to a replica: a parameter FastAPI could not resolve there would become a required
    query parameter, and every probe a 400."""
    import pickle

    from fastapi.dependencies.utils import get_dependant
    from ray import cloudpickle

    from serve_app.fronts.ingress import router  # the app's own routes, build_api includes it

    routes = [route for route in router.routes if getattr(route, "path", "") == "/health"]
    (route,) = routes
    shipped = pickle.loads(cloudpickle.dumps(route.endpoint))
    dependant = get_dependant(path=route.path_format, call=shipped)
    assert [p.name for p in dependant.query_params + dependant.body_params] == []
    assert [p.name for p in dependant.header_params] == ["authorization"]


def test_the_health_route_answers_from_the_status_cache_on_the_apps_state():
    """``GET /health`` on an app from the factory, with the status cache and the gate's keys
    on its state as the ingress puts them there: the deployments only for a valid key."""
    from fastapi.testclient import TestClient

    from serve_app.fronts.gate import GateSettings
    from serve_app.fronts.ingress import build_api

    app = build_api()
    app.state.statuses = StatusCache(Read({**HEALTHY, "x2": FAILED}))
    app.state.gate = GateSettings(api_keys=(b"sk-one",))
    with TestClient(app) as client:
        anonymous = client.get("/health")
        keyed = client.get("/health", headers={"Authorization": "Bearer sk-one"})
    assert (anonymous.status_code, anonymous.json()) == (503, {"status": "starting"})
    assert keyed.status_code == 503
    assert keyed.json()["deployments"] == {"ImagesIngress": "HEALTHY", "sd": "HEALTHY",
                                           "x2": "DEPLOY_FAILED"}
    assert "x2" in str(keyed.json()["failures"])
