"""Typed API errors and their mapping to OpenAI's error envelope.

Every failure a client can see goes through :func:`error_from_exception`, so the status
codes, ``type`` values and the rule "no traceback reaches a client" live in one place.
"""

from __future__ import annotations

import logging

from deployments.errors import InvalidJobError
from serve_app.protocol import ErrorDetail, ErrorResponse

logger = logging.getLogger("serve_app")


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorDetail(
                message=self.message, type=self.error_type, param=self.param, code=self.code
            )
        )


class InvalidRequestError(APIError):
    """400: the request is malformed or asks for something the model does not allow."""

    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(APIError):
    """404: no served model has this name or alias."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str, known: list[str]):
        super().__init__(
            f"The model '{model}' does not exist. Available models: {', '.join(known)}.",
            param="model",
            code="model_not_found",
        )


class NotFoundError(APIError):
    """404 for a route or resource that does not exist."""

    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowedError(APIError):
    status_code = 405
    error_type = "invalid_request_error"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"


class InternalServerError(APIError):
    status_code = 500
    error_type = "server_error"

    def __init__(self):
        super().__init__(
            "The server had an error while processing your request. "
            "Retry, or contact the operator with the time of the request."
        )


def _unwrap(exc: BaseException) -> BaseException:
    """Return the error raised inside a replica when Ray wraps it in a RayTaskError."""
    seen = 0
    while getattr(exc, "cause", None) is not None and seen < 8:
        exc = exc.cause  # RayTaskError / RayActorError keep the original here
        seen += 1
    return exc


def error_from_exception(exc: BaseException) -> APIError:
    """Map any exception to the APIError a client should see.

    Unknown exceptions become a generic 500 and are logged with their traceback here,
    on the server, never in the response.
    """
    if isinstance(exc, APIError):
        return exc
    inner = _unwrap(exc)
    if isinstance(inner, APIError):
        return inner
    if isinstance(inner, InvalidJobError):
        return InvalidRequestError(inner.message, param=inner.param)
    logger.error("internal error while serving a request", exc_info=exc)
    return InternalServerError()
