"""The HTTP ingress deployment: thin routes over :class:`ImagesService`."""


import asyncio
import logging
import time
from importlib import resources
from typing import Annotated, Any, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve

from serve_app.config import AppConfig, IngressConfig, load_app_config
from serve_app.service.errors import APIError, error_from_exception
from serve_app.fronts.http import install_error_handlers
from serve_app.fronts.livepeer import (
    LivepeerHTTPError,
    LivepeerHTTPValidationError,
    LivepeerImageResponse,
    LivepeerImageToImageForm,
    LivepeerTextToImageRequest,
    LivepeerUpscaleForm,
    rename_param,
    to_livepeer,
)
from serve_app.service.responses import ErrorResponse, HealthResponse, ImagesResponse, ModelCard, ModelList
from serve_app.fronts.openai import (
    IMAGE_CONTENT_TYPES,
    ImageEditForm,
    ImageGenerationRequest,
    ImageVariationForm,
    UpscaleForm,
)
from serve_app.fronts.metrics import MetricsMiddleware
from serve_app.service.planning import GenerationPlan
from serve_app.service.request import MAX_SEED
from serve_app.fronts.gate import GateMiddleware, GateSettings, api_keys_from
from serve_app.service.health import DeploymentState, StartFailureWatch, deployments_ready, start_failures
from serve_app.service.images import ImagesService

T = TypeVar("T")

PLAYGROUND_HTML = resources.files("serve_app.fronts").joinpath("static/playground.html").read_text("utf-8")


class _MultipartAlias:
    """``Multipart[Model]``: a form model read from ``multipart/form-data``, so the OpenAPI
    document shows its file fields as uploads."""

    def __getitem__(self, model):
        return Annotated[model, Form(media_type="multipart/form-data")]


Multipart = _MultipartAlias()
logger = logging.getLogger("ray.serve")  # Serve's handler adds request id, deployment and replica


def json_response(body) -> Response:
    """An images response: JSON, or Server-Sent Events when the request streams.

    Serialize a response model once, in pydantic's Rust core: images make large bodies.
    Unset optional fields (``url`` beside ``b64_json``) are left out, as OpenAI does."""
    if not isinstance(body, BaseModel):
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return Response(content=body.model_dump_json(exclude_none=True), media_type="application/json")


def base_url(request: Request) -> str:
    """Scheme, host and route prefix the client used: the root of returned image URLs."""
    return str(request.base_url).rstrip("/")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 500, 503)
}

_LIVEPEER_ERRORS: dict[int | str, dict[str, Any]] = {
    **{code: {"model": LivepeerHTTPError} for code in (400, 401, 500, 503)},
    422: {"model": LivepeerHTTPValidationError},
}


def _livepeer_route(path: str):
    """A Livepeer route and its trailing-slash twin (the runner answers both)."""
    def decorate(func):
        api.post(path + "/", response_model=LivepeerImageResponse, responses=_LIVEPEER_ERRORS,
                 include_in_schema=False)(func)
        return api.post(path, response_model=LivepeerImageResponse,
                        responses=_LIVEPEER_ERRORS)(func)
    return decorate


api = FastAPI(
    title="serve_app images API",
    summary="OpenAI-shaped image generation on Ray Serve and diffusers.",
    version="0.1.0",
)
install_error_handlers(api)
api.add_middleware(GateMiddleware)
api.add_middleware(MetricsMiddleware)  # added last: outermost, so it sees the gate's answers too


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document, built once (on first use): FastAPI's, plus what a valid upload
    is, for client generators and fuzzers. Each multipart operation's file parts get their
    image types (the requestBody's ``encoding``) and a ``maxLength``: the body limit the
    ingress enforces (``ingress.max_upload_bytes``, which the constructor installs with
    the gate before any request; the config's default until then). Integer bounds are
    written as integers, the seed's exactly (FastAPI's OpenAPI model keeps bounds as
    floats, and 2**63 - 1 as a float is 2**63, one past the largest seed)."""
    if api.openapi_schema is None:
        document = FastAPI.openapi(api)  # FastAPI's own, cached in api.openapi_schema
        gate = getattr(api.state, "gate", None)
        max_bytes = gate.max_body_bytes if gate else IngressConfig.model_fields["max_upload_bytes"].default
        _describe_uploads(document, max_bytes)
        _integer_bounds(document)
    return api.openapi_schema


def _describe_uploads(document: dict[str, Any], max_bytes: int) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    for path_item in document["paths"].values():
        for operation in path_item.values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if form is None:
                continue
            ref = form["schema"].get("$ref", "")
            schema = schemas[ref.rsplit("/", 1)[-1]] if ref else form["schema"]
            files = [name for name, field in schema.get("properties", {}).items()
                     if field.get("format") == "binary"]
            for name in files:
                schema["properties"][name]["maxLength"] = max_bytes
            form["encoding"] = {name: {"contentType": ", ".join(IMAGE_CONTENT_TYPES)}
                                for name in files}


def _integer_bounds(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _integer_bounds(item)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                bound = node.get(key)
                if isinstance(bound, float) and bound.is_integer():
                    node[key] = MAX_SEED if bound == float(MAX_SEED) else int(bound)
        for value in node.values():
            _integer_bounds(value)


api.openapi = openapi_document  # before serve.ingress below freezes a copy of the app


async def guarded(call: Awaitable[T], retry_after_s: int = 5) -> T:
    """Await ``call``; any failure becomes the APIError the client should see."""
    try:
        return await call
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to the envelope, logged with traceback
        raise error_from_exception(exc, retry_after_s) from None


@serve.ingress(api)
class ImagesIngress:
    """Validates requests, plans them and calls the model deployments through handles."""

    def __init__(self, config: AppConfig | dict, handles: dict[str, Any], store: Any = None):
        self.config = load_app_config(config)
        self.service = ImagesService(self.config, handles, store,
                                     start_failures=StartFailureWatch(self._deployment_statuses))
        ingress = self.config.ingress
        api.state.gate = GateSettings(
            api_keys=api_keys_from([key.get_secret_value() for key in ingress.api_keys]),
            max_body_bytes=ingress.max_upload_bytes,
        )

    @api.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
    async def create_image(self, request: Request, body: ImageGenerationRequest) -> Response:
        """Text to image (OpenAI's ``images.generate``)."""
        return json_response(await self._answer(request, self.service.plan(body.to_request())))

    @api.post("/v1/images/edits", response_model=ImagesResponse, responses=_ERRORS)
    async def edit_image(self, request: Request, form: Multipart[ImageEditForm]) -> Response:
        """Image + prompt to image (OpenAI's ``images.edit``); inpainting with a mask."""
        planning = self.service.plan(form.to_request(), form.image, form.mask)
        return json_response(await self._answer(request, planning))

    @api.post("/v1/images/variations", response_model=ImagesResponse, responses=_ERRORS)
    async def create_variation(
        self, request: Request, form: Multipart[ImageVariationForm]
    ) -> Response:
        """Variations of an image (OpenAI's ``images.create_variation``)."""
        return json_response(await self._answer(request, self.service.plan(form.to_request(), form.image)))

    @api.post("/v1/images/upscale", response_model=ImagesResponse, responses=_ERRORS)
    async def upscale_image(self, request: Request, form: Multipart[UpscaleForm]) -> Response:
        """Upscale an image (x2 latent, x4 or ESRGAN), the seeds' multipart shape."""
        return json_response(await self._answer(request, self.service.plan(form.to_request(), form.image)))

    @_livepeer_route("/text-to-image")
    async def livepeer_text_to_image(self, request: Request, body: LivepeerTextToImageRequest) -> Response:
        """Livepeer runner's text-to-image."""
        return await self._livepeer(request, lambda: self.service.plan(body.to_request()))

    @_livepeer_route("/image-to-image")
    async def livepeer_image_to_image(
        self, request: Request, form: Multipart[LivepeerImageToImageForm]
    ) -> Response:
        """Livepeer runner's image-to-image."""
        return await self._livepeer(request, lambda: self.service.plan(form.to_request(), form.image))

    @_livepeer_route("/upscale")
    async def livepeer_upscale(
        self, request: Request, form: Multipart[LivepeerUpscaleForm]
    ) -> Response:
        """Livepeer runner's upscale."""
        return await self._livepeer(request, lambda: self.service.plan(form.to_request(), form.image))

    async def _answer(self, request: Request, planning: Awaitable[GenerationPlan]):
        """Plan, then run: errors mapped to the envelope, the planned model and the images
        recorded for the metrics, and one log line (Serve adds the request id to it)."""
        retry_after_s = self.config.ingress.retry_after_s
        plan = await guarded(planning, retry_after_s)
        request.state.model = plan.model
        result = await guarded(self.service.execute(plan, base_url(request)), retry_after_s)
        if not isinstance(result, BaseModel):  # a stream: it logs nothing more here
            logger.info("%s model=%s streamed", request.url.path, plan.model)
            return result
        request.state.images = len(result.data)
        logger.info("%s model=%s images=%d size=%s seeds=%s", request.url.path, plan.model,
                    len(result.data), result.size, [item.seed for item in result.data])
        return result

    async def _livepeer(self, request: Request, planning: Callable[[], Awaitable[GenerationPlan]]):
        async def plan():  # converting the request may refuse it too (width without height)
            return await planning()

        try:
            return json_response(to_livepeer(await self._answer(request, plan())))
        except APIError as error:
            raise rename_param(error) from None

    @api.get(
        "/v1/images/files/{image_id}",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
                   404: {"model": ErrorResponse}},
    )
    async def image_file(self, image_id: str) -> Response:
        """An image answered with ``response_format: "url"``, until it expires."""
        data, content_type = await guarded(self.service.image_file(image_id),
                                           self.config.ingress.retry_after_s)
        return Response(content=data, media_type=content_type,
                        headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """The playground: a page to try every route from a browser (plain HTML and JS)."""
        return HTMLResponse(PLAYGROUND_HTML, headers={"Cache-Control": "no-cache"})

    @api.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
    async def list_models(self) -> ModelList:
        """Served models in OpenAI's list shape."""
        return self.service.list_models()

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS,
             response_model_exclude_none=True)
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
            deployments={name: state.status for name, state in statuses.items()},
            failures=start_failures(statuses),
        )
        return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())

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
