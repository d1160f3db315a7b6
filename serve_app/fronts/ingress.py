"""The ingress deployment: one FastAPI app carrying every HTTP front's routes.

The fronts' routes live with their wire models (``openai.py``, ``livepeer.py``); this module
puts them on one app with the error handlers, the gate and the metrics, and defines the
deployment class, which builds the replica's :class:`ImagesService` and answers what is
the app's own: ``GET /health`` and the playground page. The same class answers Stability's
gRPC ``Generate`` (``stability.py``) on Serve's gRPC proxy (``grpc_options`` in the configs).
"""

from __future__ import annotations

import contextlib
import logging
import os
from importlib import resources
from typing import Any

from fastapi import FastAPI, Header
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from serve_app.config import AppConfig, ConfigError, load_app_config
from serve_app.fronts import jobs, livepeer, openai, stability
from serve_app.fronts.gate import GateMiddleware, GateSettings, check_key
from serve_app.fronts.error_handlers import install_error_handlers
from serve_app.fronts.metrics import MetricsMiddleware
from serve_app.fronts.openapi import install_openapi, responses
from serve_app.service.health import DeploymentState, StartFailureWatch, StatusCache, health_answer
from serve_app.service.images import ImagesService
from serve_app.service.responses import HealthResponse
from serve_app.keys import API_KEYS_ENV, API_KEYS_FILE_ENV, ApiKeys, KeysError, exposure, load_api_keys

logger = logging.getLogger("ray.serve")
GRPC_LIMIT_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"

PLAYGROUND_HTML = resources.files("serve_app.fronts").joinpath("static/playground.html").read_text("utf-8")

api = FastAPI(
    title="serve_app images API",
    summary="OpenAI-shaped image generation on Ray Serve and diffusers.",
    version="0.1.0",
)
install_error_handlers(api)
api.add_middleware(GateMiddleware)
api.add_middleware(MetricsMiddleware)  # added last: outermost, so it sees the gate's answers too
# The HTTP fronts. A new one is a module beside these with a ``router``, included here.
api.include_router(openai.router)
api.include_router(livepeer.router)
api.include_router(jobs.router)
install_openapi(api)  # before serve.ingress below freezes a copy of the app


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


@serve.ingress(api)
class ImagesIngress:
    """The ingress replica: its images service (which calls the model deployments through
    their handles) for every front's routes, the API keys and body limit for the gate."""

    def __init__(self, config: AppConfig | dict, handles: dict[str, Any], store: Any = None):
        self.config = load_app_config(config)
        ingress = self.config.ingress
        keys = load_api_keys()
        low_owners = check_keys(self.config, keys, serve_listens_on())
        self.gate = GateSettings(api_keys=keys.keys, max_body_bytes=ingress.max_upload_bytes)
        api.state.gate = self.gate
        if self.config.jobs is not None:
            from serve_app.jobs.client import Jobs

            api.state.jobs = Jobs(self.config)
        _warn_on_grpc_limit(self.config)
        # Serve's status, read at most every 2 s and awaited at most 3 s, by /health and by
        # requests waiting on a deployment that may fail to start.
        self.statuses = StatusCache(self._deployment_statuses)
        # The fronts' routes find it here (fronts/shared.py: Serve's replica context).
        self.service = ImagesService(
            self.config, handles, store, start_failures=StartFailureWatch(self.statuses),
            low_moderation_owners=low_owners)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """The playground: a page to try every route from a browser (plain HTML and JS)."""
        return HTMLResponse(PLAYGROUND_HTML, headers={"Cache-Control": "no-cache"})

    @api.get("/health", response_model=HealthResponse, responses={
        **responses(open_route=True),
        503: {"model": HealthResponse, "description": "Some deployment has no running replica yet "
              "(`starting`), or Serve's controller did not answer (`unknown`); with keys off or "
              "a valid key, `failures` names those whose replicas fail to start, with why."}})
    async def health(self, authorization: str | None = Header(default=None, include_in_schema=False)
                     ) -> JSONResponse:
        """200 once every deployment of this application has running replicas, else 503;
        the deployments and their start failures only for a caller the API keys let in."""
        # (A header parameter, not the Request: Serve ships this class's methods to the replica
        # by value, where an annotation naming an imported class does not resolve.)
        keys = self.gate.api_keys
        detailed = not keys or check_key((authorization or "").encode(), keys) is None
        status_code, body = health_answer(await self.statuses.get(), detailed)
        return JSONResponse(status_code=status_code,
                            content=HealthResponse(**body).model_dump(exclude_none=True))

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
