"""The ingress: the app factory and the ingress deployment.

:func:`build_api` builds the FastAPI app carrying every HTTP front's routes (their routers
live with their wire models, ``openai.py``, ``livepeer.py``, ``jobs.py``), the app's own
(``GET /health`` and the playground), the error handlers, the gate, the metrics and the
OpenAPI document. The deployment class builds one app per replica in its constructor and puts
on its ``app.state`` what the routes find there (:data:`APP_STATE`); Serve asks for that app
once the constructor returns (``__serve_build_asgi_app__``), so no app is pickled or shared.
The same class answers Stability's gRPC ``Generate`` (``stability.py``) on Serve's gRPC
proxy (``grpc_options`` in the configs).
"""

from __future__ import annotations

import contextlib
import logging
import os
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from serve_app.config import AppConfig, ConfigError, load_app_config
from serve_app.fronts import jobs, livepeer, openai, stability
from serve_app.fronts.gate import GateMiddleware, GateSettings, check_key, gate_settings
from serve_app.fronts.error_handlers import install_error_handlers
from serve_app.fronts.metrics import MetricsMiddleware
from serve_app.fronts.openapi import install_openapi, responses
from serve_app.service.health import DeploymentState, StartFailureWatch, StatusCache, health_answer
from serve_app.service.images import ImagesService
from serve_app.protocol.responses import HealthResponse
from serve_app.protocol.keys import API_KEYS_ENV, API_KEYS_FILE_ENV, ApiKeys, KeysError, exposure, load_api_keys

logger = logging.getLogger("ray.serve")
GRPC_LIMIT_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"

PLAYGROUND_HTML = resources.files("serve_app.fronts").joinpath("static/playground.html").read_text("utf-8")

# What the routes find on ``app.state`` (the ingress's constructor puts them there; a test
# puts its own): the images service (``shared.images_service``), the gate's settings
# (``gate.gate_settings``; defaults without), the jobs client (``jobs._jobs``; None: the jobs
# API is off) and Serve's status cache for ``/health``.
APP_STATE = ("service", "gate", "jobs", "statuses")

# The app's own routes: the playground and the health probe.
router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    """The playground: a page to try every route from a browser (plain HTML and JS)."""
    return HTMLResponse(PLAYGROUND_HTML, headers={"Cache-Control": "no-cache"})


@router.get("/health", response_model=HealthResponse, responses={
    **responses(open_route=True),
    503: {"model": HealthResponse, "description": "Some deployment has no running replica yet "
          "(`starting`), or Serve's controller did not answer (`unknown`); with keys off or "
          "a valid key, `failures` names those whose replicas fail to start, with why."}})
async def health(request: Request,
                 authorization: str | None = Header(default=None, include_in_schema=False)
                 ) -> JSONResponse:
    """200 once every deployment of this application has running replicas, else 503;
    the deployments and their start failures only for a caller the API keys let in."""
    keys = gate_settings(request.app).api_keys
    detailed = not keys or check_key((authorization or "").encode(), keys) is None
    status_code, body = health_answer(await request.app.state.statuses.get(), detailed)
    return JSONResponse(status_code=status_code,
                        content=HealthResponse(**body).model_dump(exclude_none=True))


def build_api() -> FastAPI:
    """A new FastAPI app with every HTTP route, the error handlers, the gate (API keys, body
    limit), the metrics and the OpenAPI document; its ``app.state`` is the caller's to fill
    (:data:`APP_STATE`) before the first request."""
    app = FastAPI(
        title="serve_app images API",
        summary="OpenAI-shaped image generation on Ray Serve and diffusers.",
        version="0.1.0",
    )
    install_error_handlers(app)
    app.add_middleware(GateMiddleware)
    app.add_middleware(MetricsMiddleware)  # added last: outermost, so it sees the gate's answers too
    # The HTTP fronts. A new one is a module beside these with a ``router``, included here.
    app.include_router(openai.router)
    app.include_router(livepeer.router)
    app.include_router(jobs.router)
    app.include_router(router)
    app.state.jobs = None  # the jobs API is off unless the ingress's config has a jobs section
    install_openapi(app)
    return app


def _warn_on_grpc_limit(config: AppConfig, environ=os.environ) -> bool:
    """Log a warning when Serve's gRPC proxy reads messages far larger than this app takes
    (the profiles set the limit through the controller, whose environment the replicas
    share): an unauthenticated client could make the proxy hold that much per call."""
    value, need = environ.get(GRPC_LIMIT_ENV), config.grpc_message_bytes
    if value is not None and value.strip().isdigit() and int(value) <= 4 * need:
        return False
    logger.warning("%s is %s: Serve's gRPC proxy reads whole messages of that size before the "
                   "API key is checked; this app needs %d bytes (set it in the config's "
                   "controller_options.runtime_env.env_vars, docs/api.md#message-sizes)",
                   GRPC_LIMIT_ENV, value or "unset (2 GiB)", need)
    return True


def serve_listens_on() -> list[str]:
    """What this Serve instance's proxies listen on beyond loopback, asked of its controller
    (the serve config's http_options and grpc_options); if the controller does not say, that
    much is said instead (and counts as beyond loopback)."""
    try:
        import ray
        from ray.serve._private.utils import is_grpc_enabled
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        http, grpc_options = ray.get([controller.get_http_config.remote(),
                                      controller.get_grpc_config.remote()], timeout=30)
        return exposure(http.host, is_grpc_enabled(grpc_options))
    except Exception as exc:  # noqa: BLE001 - reported as an unknown address
        return [f"an address Serve's controller did not tell ({type(exc).__name__})"]


def check_keys(config: AppConfig, keys: ApiKeys, listening: list[str]) -> frozenset[str]:
    """Refuse to start (a :class:`ConfigError`) without API keys while listening beyond loopback,
    unless ``ingress.allow_anonymous`` says so (then a warning is logged); the owners of the keys
    ``safety.allow_low_keys`` names."""
    if not keys and listening:
        where = ", ".join(listening)
        if not config.ingress.allow_anonymous:
            raise ConfigError(
                f"no API keys, and Serve listens beyond loopback ({where}): set keys in "
                f"{API_KEYS_ENV} or a file named by {API_KEYS_FILE_ENV}, bind HTTP to 127.0.0.1 "
                "without a gRPC port, or set ingress.allow_anonymous: true to serve anyone who "
                "can reach it")
        logger.warning("Serving without API keys on %s (ingress.allow_anonymous): anyone who "
                       "can reach it may use every model", where)
    safety = config.safety
    if safety is None or not safety.allow_low_keys:
        return frozenset()
    try:
        return keys.owners_named(safety.allow_low_keys)
    except KeysError as exc:
        raise ConfigError(f"safety.allow_low_keys: {exc}") from None


@serve.ingress()  # the app: __serve_build_asgi_app__, called once the constructor returns
class ImagesIngress:
    """The ingress replica: its app (:func:`build_api`) with what the routes need on its
    state (the images service, which calls the model deployments through their handles; the
    API keys and body limit for the gate; the jobs client; Serve's status for /health), and
    Stability's gRPC ``Generate``."""

    def __init__(self, config: AppConfig | dict, handles: dict[str, Any], store: Any = None):
        self.config = load_app_config(config)
        ingress = self.config.ingress
        keys = load_api_keys()
        low_owners = check_keys(self.config, keys, serve_listens_on())
        self.gate = GateSettings(api_keys=keys.keys, max_body_bytes=ingress.max_upload_bytes)
        _warn_on_grpc_limit(self.config)
        # Serve's status, read at most every 2 s and awaited at most 3 s, by /health and by
        # requests waiting on a deployment that may fail to start.
        self.statuses = StatusCache(self._deployment_statuses)
        self.service = ImagesService(
            self.config, handles, store, start_failures=StartFailureWatch(self.statuses),
            low_moderation_owners=low_owners)
        self.api = build_api()
        state = self.api.state
        state.service, state.gate, state.statuses = self.service, self.gate, self.statuses
        if self.config.jobs is not None:
            from serve_app.jobs.client import Jobs

            state.jobs = Jobs(self.config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve's hook for an ingress given no app: this replica's, as the constructor built it."""
        return self.api

    async def Generate(self, request, grpc_context):  # noqa: N802 - the RPC's name
        """Stability's ``gooseai.GenerationService/Generate`` on Serve's gRPC proxy
        (fronts/stability.py): a stream of Answers, or a status naming the field at fault."""
        answers = stability.generate(self.service, self.gate.api_keys, request,
                                     grpc_context.invocation_metadata())
        try:
            async with contextlib.aclosing(answers):  # closed with this stream, however it ends
                async for answer in answers:
                    yield answer
        except stability.StabilityError as error:
            # Serve's proxy answers with the code and details set here (no traceback).
            grpc_context.set_code(error.code)
            grpc_context.set_details(error.message)
            raise

    @staticmethod
    def _deployment_statuses() -> dict[str, DeploymentState]:
        app_name = serve.get_replica_context().app_name
        app = serve.status().applications.get(app_name)
        if app is None:
            return {}
        return {
            name: DeploymentState(str(getattr(d.status, "value", d.status)),
                                  int(d.replica_states.get("RUNNING", 0)),
                                  str(getattr(d.status_trigger, "value", d.status_trigger)),
                                  d.message or "")
            for name, d in app.deployments.items()
        }
