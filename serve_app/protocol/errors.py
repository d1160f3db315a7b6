"""Typed API errors and their mapping to OpenAI's error envelope.

Every failure a client can see goes through :func:`error_from_exception`, so the status
codes, ``type`` values and the rule "no traceback reaches a client" live in one place.
"""

from __future__ import annotations

import logging

from deployments.errors import InvalidJobError, ServerFaultError, UpstreamLost
from serve_app.protocol.responses import ErrorDetail, ErrorResponse

logger = logging.getLogger("ray.serve")  # Serve adds the request id to each line


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = {}

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


class ModerationBlockedError(APIError):
    """400: the safety checker flagged an image and the policy is to refuse the request."""

    status_code = 400
    error_type = "image_generation_user_error"  # OpenAI's type for moderation refusals

    def __init__(self, flagged: int, total: int, param: str):
        super().__init__(
            f"Your request was rejected by the safety system: {flagged} of {total} generated "
            "images were flagged as possibly unsafe. Change the prompt, image or seed and retry.",
            param=param,
            code="moderation_blocked",
        )


class NotFoundError(APIError):
    """404 for a route or resource that does not exist."""

    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowedError(APIError):
    status_code = 405
    error_type = "invalid_request_error"


class ServiceUnavailableError(APIError):
    """503: a model's queue is full; the client should retry after ``retry_after_s``."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, code="overloaded")
        self.headers["Retry-After"] = str(retry_after_s)


class GatewayTimeoutError(APIError):
    """504: the request ran past the configured timeout and was cancelled."""

    status_code = 504
    error_type = "server_error"

    def __init__(self, timeout_s: float):
        super().__init__(
            f"The request did not finish within {timeout_s:g} s and was cancelled.",
            code="timeout",
        )


class ServerFaultAPIError(APIError):
    """500: the request was fine and the server could not run it (a library clash, a file its
    config names missing on the server): the message says what, without a traceback. The
    answer to a replica's :class:`~deployments.errors.ServerFaultError`, and to the image
    store's refusals."""

    status_code = 500
    error_type = "server_error"


class ModelUnavailableError(APIError):
    """503: a deployment the request needs cannot start a replica (Serve reports why, and
    ``what`` names it: "The model 'x'", "The safety checker"); the request was fine."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, what: str, cause: str, retry_after_s: int):
        super().__init__(
            f"{what} cannot start on the server: {cause}. This is a fault of the "
            "server, not of the request; the operator sees it in the deployment's status. "
            "Retry later.",
            code="model_unavailable",
        )
        self.headers["Retry-After"] = str(retry_after_s)


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


def error_from_exception(exc: BaseException, retry_after_s: int = 5) -> APIError:
    """Map any exception to the APIError a client should see.

    Unknown exceptions become a generic 500 and are logged with their traceback here,
    on the server, never in the response.
    """
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, APIError):
        return exc
    inner = _unwrap(exc)
    if isinstance(inner, APIError):
        return inner
    if isinstance(inner, InvalidJobError):
        return InvalidRequestError(inner.message, param=inner.param)
    if isinstance(inner, ServerFaultError):
        logger.error("a server fault while serving a request: %s", inner.message)
        return ServerFaultAPIError(inner.message, code=inner.code)
    if isinstance(inner, BackPressureError):
        return ServiceUnavailableError(
            "The model is at capacity and its queue is full; retry shortly.", retry_after_s
        )
    if isinstance(inner, (RayActorError, ActorUnavailableError, UpstreamLost)):
        logger.warning("a model replica failed during a request: %s", type(inner).__name__)
        return ServiceUnavailableError(
            "A model replica failed while working on this request; it is being replaced. "
            "Retry shortly.",
            retry_after_s,
        )
    logger.error("internal error while serving a request", exc_info=exc)
    return InternalServerError()
