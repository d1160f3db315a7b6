"""HTTP error handling: every failure leaves with the right status, in OpenAI's envelope,
or in the shape a front registers for its own routes (:func:`register_error_shape`:
Livepeer's runner shape on Livepeer's routes, serve_app/fronts/livepeer.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.protocol.errors import (
    APIError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    error_from_exception,
)


@dataclass(frozen=True)
class ErrorShape:
    """How a front answers errors on its own routes: ``error`` gives (status, body) of an
    APIError, ``validation`` the 422 body of FastAPI's validation errors."""

    paths: frozenset[str]
    error: Callable[[APIError], tuple[int, dict]]
    validation: Callable[[list[dict]], dict]


_SHAPES: list[ErrorShape] = []


def register_error_shape(shape: ErrorShape) -> None:
    """A front's error shape on its routes (OpenAI's envelope answers everywhere else)."""
    _SHAPES.append(shape)


def _shape(path: str | None) -> ErrorShape | None:
    return next((shape for shape in _SHAPES if path in shape.paths), None)


def route_path(scope: dict[str, Any]) -> str:
    """The path below the app's route prefix (Serve mounts an app at its root_path)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def error_response(error: APIError, path: str | None = None) -> JSONResponse:
    """``error`` as the route at ``path`` answers errors: its front's registered shape,
    OpenAI's envelope everywhere else."""
    shape = _shape(path)
    if shape is not None:
        status, body = shape.error(error)
        return JSONResponse(status_code=status, content=body, headers=error.headers or None)
    return JSONResponse(
        status_code=error.status_code,
        content=error.to_response().model_dump(),
        headers=error.headers or None,
    )


def _param(loc: tuple[Any, ...]) -> str | None:
    # loc is ("body", "n") for a JSON field, ("body", 12) for a JSON syntax error.
    parts = [str(p) for p in loc[1:] if isinstance(p, str)]
    if parts and parts[0] == "loras":  # its union's member names are not fields
        return "loras"
    return ".".join(parts) or None


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequestError:
    """Turn FastAPI/pydantic validation errors into one 400 naming the first bad field."""
    first = errors[0] if errors else {"type": "unknown", "loc": (), "msg": "invalid request"}
    kind, loc = first.get("type"), tuple(first.get("loc", ()))
    param = _param(loc)
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return InvalidRequestError(
            f"We could not parse the JSON body of your request ({detail}). "
            "Send a JSON object with Content-Type: application/json.",
            code="invalid_json",
        )
    if param is None and kind in ("model_attributes_type", "dict_type", "missing"):
        return InvalidRequestError("The request body must be a JSON object.", code="invalid_body")
    if kind == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    if kind == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return InvalidRequestError(f"Invalid '{param}': {message}.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error raised while serving ``app`` through the envelope."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        shape = _shape(route_path(request.scope))
        if shape is not None:  # FastAPI's own 422, in the front's shape (Livepeer's runner's)
            return JSONResponse(status_code=422, content=shape.validation(errors))
        return error_response(validation_error(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error: APIError = NotFoundError(f"No route {request.method} {request.url.path}.")
        elif exc.status_code == 405:
            error = MethodNotAllowedError(
                f"Method {request.method} is not allowed on {request.url.path}."
            )
        else:
            error = APIError(str(exc.detail))
            error.status_code = exc.status_code
            error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        # Starlette's own headers go with it: a 405's Allow (RFC 9110 requires it).
        error.headers.update(exc.headers or {})
        return error_response(error, route_path(request.scope))

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, route_path(request.scope))

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        # Anything unexpected, Ray's wrapped replica errors included: mapped, and logged
        # server-side with its traceback, never echoed to the client.
        return error_response(error_from_exception(exc), route_path(request.scope))
