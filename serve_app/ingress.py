"""The HTTP ingress deployment: thin routes over :class:`ImagesService`."""


import asyncio
from typing import Any, Awaitable, TypeVar

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve

from serve_app.config import AppConfig, load_app_config
from serve_app.errors import APIError, error_from_exception
from serve_app.http import install_error_handlers
from serve_app.protocol import (
    ErrorResponse,
    HealthResponse,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from serve_app.serving import ImagesService

T = TypeVar("T")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 500, 503)
}

api = FastAPI(
    title="serve_app images API",
    summary="OpenAI-shaped image generation on Ray Serve and diffusers.",
    version="0.1.0",
)
install_error_handlers(api)

# A deployment counts as ready in these states; replicas keep serving while Serve scales.
_READY_STATES = {"HEALTHY", "UPSCALING", "DOWNSCALING"}


def deployments_ready(statuses: dict[str, tuple[str, int]]) -> bool:
    """``statuses`` maps deployment name to (status, running replicas)."""
    return bool(statuses) and all(
        status in _READY_STATES or running > 0 for status, running in statuses.values()
    )


async def guarded(call: Awaitable[T]) -> T:
    """Await ``call``; any failure becomes the APIError the client should see."""
    try:
        return await call
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to the envelope, logged with traceback
        raise error_from_exception(exc) from None


@serve.ingress(api)
class ImagesIngress:
    """Validates requests, plans them and calls the model deployments through handles."""

    def __init__(self, config: AppConfig | dict, handles: dict[str, Any]):
        self.config = load_app_config(config)
        self.service = ImagesService(self.config, handles)

    @api.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
    async def create_image(self, body: ImageGenerationRequest) -> ImagesResponse:
        """Text to image (OpenAI's ``images.generate``)."""
        return await guarded(self.service.generate(body))

    @api.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> ModelList:
        """Served models in OpenAI's list shape."""
        return self.service.list_models()

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def retrieve_model(self, model_id: str) -> ModelCard:
        """One served model, by name or alias."""
        return self.service.get_model(model_id)

    @api.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health(self) -> JSONResponse:
        """200 once every deployment of this application has running replicas, else 503."""
        statuses = await asyncio.to_thread(self._deployment_statuses)
        ready = deployments_ready(statuses)
        body = HealthResponse(
            status="ok" if ready else "starting",
            deployments={name: status for name, (status, _) in statuses.items()},
        )
        return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())

    @staticmethod
    def _deployment_statuses() -> dict[str, tuple[str, int]]:
        app_name = serve.get_replica_context().app_name
        app = serve.status().applications.get(app_name)
        if app is None:
            return {}
        return {
            name: (str(getattr(d.status, "value", d.status)), int(d.replica_states.get("RUNNING", 0)))
            for name, d in app.deployments.items()
        }
