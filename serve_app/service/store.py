"""Calls to the image store deployment (``deployments/store/image_store.py``) from the ingress and
the jobs consumer: each bounded by ``image_store.call_timeout_s``, its refusals and faults
told to the client as the errors they are (the store is the server's: a 503 with
Retry-After, or a 429 when the caller's own share is full)."""

from __future__ import annotations

import asyncio
from typing import Any

# IMAGE and INPUT are the store's pools; the fronts and jobs name them through this module.
from deployments.store.image_store import IMAGE, INPUT, StoreRefused, valid_id
from serve_app.protocol.errors import APIError, ServerFaultAPIError, _unwrap


class StoreUnavailableError(APIError):
    """503: the store did not answer in time, or its replica is being replaced."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, retry_after_s: int, code: str = "store_unavailable"):
        super().__init__(f"{message} This is a fault of the server, not of the request; retry "
                         "later.", code=code)
        self.headers["Retry-After"] = str(retry_after_s)


class StoreQuotaError(APIError):
    """429: the caller's own share of the store is full of what cannot be evicted (its
    queued jobs' uploads)."""

    status_code = 429
    error_type = "insufficient_quota"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(f"The image store refused it: {message}. Retry once some of this "
                         "key's jobs have ended.", code="store_quota_exceeded")
        self.headers["Retry-After"] = str(retry_after_s)


def _refusal(refused: StoreRefused, retry_after_s: int) -> APIError:
    if refused.reason == "key_quota":
        return StoreQuotaError(refused.message, retry_after_s)
    if refused.reason == "full":
        return StoreUnavailableError(f"The image store refused it: {refused.message}.",
                                     retry_after_s, code="store_full")
    return ServerFaultAPIError(f"The image store refused it: {refused.message} (see image_store in the "
                       "server's config).", code="store_limit")


class ImageStoreClient:
    """The store deployment's handle, each call bounded by ``timeout_s``."""

    def __init__(self, handle: Any, timeout_s: float, retry_after_s: int):
        self.handle, self.timeout_s, self.retry_after_s = handle, timeout_s, retry_after_s

    @classmethod
    def of(cls, handle: Any, config) -> ImageStoreClient | None:
        """The client of an app config's store (None without a store handle)."""
        if handle is None:
            return None
        return cls(handle, config.image_store.call_timeout_s, config.ingress.retry_after_s)

    async def put_many(self, items: list[tuple[bytes, str]], owner: str = "", kind: str = IMAGE) -> list[str]:
        """Store every ``(data, content type)`` for ``owner`` (all or none); their ids."""
        return await self._call("put_many", items, owner, kind)

    async def put(self, data: bytes, content_type: str, owner: str = "", kind: str = IMAGE) -> str:
        return (await self.put_many([(data, content_type)], owner, kind))[0]

    async def get(self, image_id: str, kind: str = IMAGE) -> tuple[bytes, str] | None:
        """(bytes, content type), or None: unknown, expired, or not an id at all (never asked)."""
        if not valid_id(image_id):
            return None
        return await self._call("get", image_id, kind)

    async def delete(self, image_ids: list[str]) -> int:
        return await self._call("delete", list(image_ids))

    async def _call(self, method: str, *args):
        response = getattr(self.handle, method).remote(*args)

        async def result():
            return await response

        try:
            return await asyncio.wait_for(result(), self.timeout_s)
        except TimeoutError:
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()
            raise StoreUnavailableError(
                f"The image store did not answer within {self.timeout_s:g} s "
                "(image_store.call_timeout_s).", self.retry_after_s) from None
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store's refusals and Ray's faults
            from ray.exceptions import ActorUnavailableError, RayActorError
            from ray.serve.exceptions import BackPressureError

            inner = _unwrap(exc)
            if isinstance(inner, StoreRefused):
                raise _refusal(inner, self.retry_after_s) from None
            if isinstance(inner, (RayActorError, ActorUnavailableError, BackPressureError)):
                raise StoreUnavailableError("The image store's replica is unavailable.",
                                            self.retry_after_s) from None
            raise
