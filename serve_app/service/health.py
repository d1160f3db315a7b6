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
            # The exception's class without its module path: "deployments.loras.X: ..." -> "X: ..."
            cause = _MODULE_PATH.sub("", lines[-1]) if lines else "its replicas fail to start"
            failed[name] = cause if len(cause) <= 400 else cause[:397] + "..."
    return failed


class StartFailureWatch:
    """:func:`start_failures` of this application, from ``read`` (a blocking read of Serve's
    status, run in a thread), read again at most every ``max_age_s``: every waiting request
    shares one read instead of asking the controller each."""

    def __init__(self, read: Callable[[], dict[str, DeploymentState]], max_age_s: float = 2.0):
        self.read, self.max_age_s = read, max_age_s
        self._at, self._failures = float("-inf"), {}
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict[str, str]:
        async with self._lock:
            if time.monotonic() - self._at >= self.max_age_s:
                try:
                    self._failures = start_failures(await asyncio.to_thread(self.read))
                except Exception:  # noqa: BLE001 - the controller busy: keep the last answer
                    logger.warning("could not read Serve's status", exc_info=True)
                self._at = time.monotonic()
            return self._failures
