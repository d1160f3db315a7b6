"""The ingress's gate: API keys and the upload size limit, as ASGI middleware.

Both run before FastAPI reads the body, so a request without a valid key or with an
oversized body is refused before any of it is parsed or held in memory.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

from serve_app.protocol.errors import APIError
from serve_app.fronts.error_handlers import error_response, route_path

# Open without a key: health probes, the API's own description and the playground page
# (which holds no data: it asks for a key and sends it with its API calls).
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
# Stored images: their unguessable id is the credential, so links work in an <img> tag.
OPEN_PREFIXES = ("/v1/images/files/",)


class AuthenticationError(APIError):
    status_code = 401
    error_type = "invalid_request_error"

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key")
        self.headers["WWW-Authenticate"] = "Bearer"


class DuplicateAuthorizationError(APIError):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, count: int):
        super().__init__(f"The request has {count} Authorization headers; send exactly one.",
                         param="Authorization", code="duplicate_authorization")


def authorization_of(headers) -> bytes:
    """The one ``Authorization`` value of ASGI ``headers`` (name, value) pairs, b"" without
    one; two or more are a :class:`DuplicateAuthorizationError`, as the key check and the
    caller's identity must read the same one."""
    found = [value for name, value in headers if name.lower() == b"authorization"]
    if len(found) > 1:
        raise DuplicateAuthorizationError(len(found))
    return found[0] if found else b""


def presented_key(authorization: bytes) -> bytes | None:
    """The key an ``Authorization`` value carries (``Bearer KEY``: its token), None without one."""
    return authorization.partition(b" ")[2].strip() or None if authorization else None


# Where the gate leaves the request's one Authorization value for the routes (the scope's
# state, Starlette's ``request.state``).
AUTHORIZATION_STATE = "authorization"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"

    def __init__(self, limit: int):
        super().__init__(
            f"The request body is larger than the limit of {limit} bytes.",
            code="request_too_large",
        )


@dataclass(frozen=True)
class GateSettings:
    """What the gate enforces; built by the ingress from its config and environment."""

    api_keys: tuple[bytes, ...] = field(default=(), repr=False)  # never in a repr or a log
    max_body_bytes: int = 20_000_000


def key_is_valid(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    """Constant-time check against every key (no early exit that would time which one)."""
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(presented, key)
    return valid


def check_key(header: bytes, keys: tuple[bytes, ...]) -> APIError | None:
    """The error for an ``Authorization`` value (HTTP header or gRPC metadata) that does not
    carry one of ``keys`` as ``Bearer KEY``; None when it does."""
    scheme, _, token = header.partition(b" ")
    if not header:
        return AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    if scheme.lower() != b"bearer" or not key_is_valid(token.strip(), keys):
        return AuthenticationError("Incorrect API key provided.")
    return None


async def _send_error(scope, send, error: APIError) -> None:
    """Answer with ``error`` from the ASGI layer, as the route would answer it."""
    await error_response(error, route_path(scope))({"type": "http"}, None, send)


class _BodyTooLarge(Exception):
    """Raised into the app when the body runs over the limit, to stop it reading."""


def gate_settings(app) -> GateSettings:
    """What the gate of ``app`` enforces: its ``app.state.gate``, which the ingress puts there
    from its config (no keys and the default body limit without one)."""
    return getattr(app.state, "gate", None) or GateSettings()


class GateMiddleware:
    """Checks the API key, then counts body bytes as they stream in (413 past the limit).

    Settings are read per request from ``app.state.gate`` (:func:`gate_settings`), which the
    ingress fills after the app factory built the app.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = gate_settings(scope["app"])
        try:
            authorization = authorization_of(scope.get("headers") or [])
        except DuplicateAuthorizationError as error:
            return await _send_error(scope, send, error)
        scope.setdefault("state", {})[AUTHORIZATION_STATE] = authorization
        headers = dict(scope.get("headers") or [])
        path = route_path(scope)
        if settings.api_keys and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            error = check_key(authorization, settings.api_keys)
            if error is not None:
                return await _send_error(scope, send, error)
        limit = settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(scope, send, PayloadTooLargeError(limit))
        await self._call_counting(scope, receive, send, limit)

    async def _call_counting(self, scope, receive, send, limit: int) -> None:
        received = 0
        exceeded = False
        responded = False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            # Once the body ran over, whatever the app answers (FastAPI turns errors while
            # reading a body into a 400) is replaced by the 413.
            nonlocal responded
            if exceeded:
                if not responded:
                    responded = True
                    await _send_error(scope, send, PayloadTooLargeError(limit))
                return
            if message["type"] == "http.response.start":
                responded = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not responded:
            await _send_error(scope, send, PayloadTooLargeError(limit))
