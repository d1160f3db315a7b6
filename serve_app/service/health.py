"""What Serve's status says of this application: readiness (``GET /health``) and the
deployments whose replicas fail to start (a request for one answers 503 at once, naming
the cause, instead of waiting for a replica that will not come)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Callable, NamedTuple

logger = logging.getLogger("ray.serve")


# A deployment counts as ready in these states; replicas keep serving while Serve scales.
_READY_STATES = {"HEALTHY", "UPSCALING", "DOWNSCALING"}


class DeploymentState(NamedTuple):
    """What Serve's status says of one deployment."""

    status: str  # HEALTHY, UPSCALING, UNHEALTHY, DEPLOY_FAILED...
    running: int  # replicas in the RUNNING state
    trigger: str = ""  # why the status is what it is: REPLICA_STARTUP_FAILED...
    message: str = ""  # Serve's message: a failed start ends with the error's last line


def deployments_ready(statuses: dict[str, tuple]) -> bool:
    """``statuses`` maps deployment name to a :class:`DeploymentState` (status, running
    replicas, ...)."""
    return bool(statuses) and all(
        state[0] in _READY_STATES or state[1] > 0 for state in statuses.values()
    )


# Serve gave up starting replicas for now (it retries later): the deployment is one of these
# with this trigger.
_FAILED_STATES = {"UNHEALTHY", "DEPLOY_FAILED"}
_MODULE_PATH = re.compile(r"^(?:[a-z_]\w*\.)+(?=[A-Z]\w*:)")


def start_failures(statuses: dict[str, DeploymentState]) -> dict[str, str]:
    """Deployments without a running replica because their replicas fail to start, each
    with the cause: the last line of Serve's message, the exception its constructor raised
    (``FileNotFoundError: ...``), never the traceback above it."""
    failed = {}
    for name, state in statuses.items():
        if (state.running == 0 and state.status in _FAILED_STATES
                and state.trigger == "REPLICA_STARTUP_FAILED"):
            lines = [line.strip() for line in state.message.splitlines() if line.strip()]
            # The exception's class without its module path: "deployments.runtime.loras.X: ..." -> "X: ..."
            cause = _MODULE_PATH.sub("", lines[-1]) if lines else "its replicas fail to start"
            failed[name] = cause if len(cause) <= 400 else cause[:397] + "..."
    return failed


# Serve's status is read at most this often (every caller in between shares the answer) and
# awaited at most this long: the controller may be away (a head restart).
STATUS_MAX_AGE_S = 2.0
STATUS_TIMEOUT_S = 3.0


class StatusSnapshot(NamedTuple):
    """The last statuses read (None before the first read that answered), and whether they
    are current: read within the max age by a read that answered."""

    statuses: dict[str, DeploymentState] | None
    fresh: bool


class StatusCache:
    """Serve's status of this application from ``read`` (a blocking read, run in a thread),
    read again at most every ``max_age_s``: callers in between share the last answer, callers
    during a read share that read. A caller waits for a read at most ``timeout_s`` (counted
    from the read's start) and then gets the last answer marked stale; a read the controller
    does not answer stays the only one in flight until it returns, so a hung controller holds
    one thread, not one per caller."""

    def __init__(self, read: Callable[[], dict[str, DeploymentState]],
                 max_age_s: float = STATUS_MAX_AGE_S, timeout_s: float = STATUS_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic):
        self.read, self.max_age_s, self.timeout_s, self.clock = read, max_age_s, timeout_s, clock
        self._statuses: dict[str, DeploymentState] | None = None
        self._fresh = False  # the last read answered
        self._ended = float("-inf")  # when the last read ended, answered or not
        self._inflight: asyncio.Task | None = None
        self._started = 0.0

    async def get(self) -> StatusSnapshot:
        """The statuses: cached, or from the read in flight, or from a new read."""
        if self._inflight is None and self.clock() - self._ended < self.max_age_s:
            return StatusSnapshot(self._statuses, self._fresh)
        if self._inflight is None:
            self._started = self.clock()
            self._inflight = asyncio.ensure_future(self._read())
        remaining = self._started + self.timeout_s - self.clock()
        if remaining > 0:
            try:  # shielded: a caller that stops waiting leaves the read to the others
                await asyncio.wait_for(asyncio.shield(self._inflight), remaining)
            except TimeoutError:
                pass
        if self._inflight is not None:  # still reading: the last answer, stale
            return StatusSnapshot(self._statuses, False)
        return StatusSnapshot(self._statuses, self._fresh)

    async def _read(self) -> None:
        try:
            statuses = await asyncio.to_thread(self.read)
        except Exception:  # noqa: BLE001 - the controller away: keep the last answer, stale
            logger.warning("could not read Serve's status", exc_info=True)
            self._fresh = False
        else:
            self._statuses, self._fresh = statuses, True
        finally:
            self._ended, self._inflight = self.clock(), None


class StartFailureWatch:
    """:func:`start_failures` of this application, from a :class:`StatusCache` (or a blocking
    ``read`` of Serve's status, cached ``max_age_s``): every waiting request shares one read
    instead of asking the controller each, and a read that fails or times out keeps the last
    answer."""

    def __init__(self, statuses: StatusCache | Callable[[], dict[str, DeploymentState]],
                 max_age_s: float = STATUS_MAX_AGE_S):
        self.statuses = statuses if isinstance(statuses, StatusCache) else StatusCache(statuses, max_age_s)
        self._read_from: dict | None = None
        self._failures: dict[str, str] = {}

    async def __call__(self) -> dict[str, str]:
        statuses = (await self.statuses.get()).statuses
        if statuses is not None and statuses is not self._read_from:
            self._read_from, self._failures = statuses, start_failures(statuses)
        return self._failures


def health_answer(snapshot: StatusSnapshot, detailed: bool) -> tuple[int, dict]:
    """``GET /health``'s status code and body. 200 ``ok`` once every deployment has a
    running replica, 503 ``starting`` until then, 503 ``unknown`` when Serve's controller did
    not answer (its status is not known: the last one is not claimed). ``detailed`` (API keys
    off, or the caller sent a valid key) adds the deployments' states and start failures; an
    anonymous caller on a server with keys gets the status alone, nothing of the internals."""
    if not snapshot.fresh or snapshot.statuses is None:
        return 503, {"status": "unknown"}
    statuses = snapshot.statuses
    ready = deployments_ready(statuses)
    body: dict = {"status": "ok" if ready else "starting"}
    if detailed:
        body["deployments"] = {name: state.status for name, state in statuses.items()}
        body["failures"] = start_failures(statuses)
    return (200 if ready else 503), body
