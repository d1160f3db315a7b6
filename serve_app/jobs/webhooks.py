"""Webhooks when a job ends, per the Standard Webhooks specification
(https://www.standardwebhooks.com): ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``), signed with the
``standardwebhooks`` library; posted with retries and exponential backoff on anything but a
2xx, a bounded number of times; only to hosts the operator allows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook


# The signing secret when the config gives none ("whsec_" + base64).
WEBHOOK_SECRET_ENV = "SERVE_APP_WEBHOOK_SECRET"


class WebhookURLError(ValueError):
    """A webhook URL the server will not call: the message says why."""


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` is one of ``allowed``, or under one of its ``*.domain`` entries."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]:
            return True
        if host == entry:
            return True
    return False


@dataclass(frozen=True)
class WebhookPolicy:
    """Where webhooks may go: https to ``allowed_hosts`` (exact names, or ``*.domain``), and
    plain http only to ``allowed_http_hosts`` (the tiny profile's localhost). Nothing else:
    no address the operator did not name, so a client cannot make the server probe its own
    network."""

    allowed_hosts: tuple[str, ...] = ()
    allowed_http_hosts: tuple[str, ...] = ()

    def check(self, url: str) -> str:
        """``url`` if a webhook may be posted there; else :class:`WebhookURLError`."""
        if len(url) > 2048:
            raise WebhookURLError("the URL is longer than 2048 characters")
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("https", "http") or not host:
            raise WebhookURLError("expected an https:// URL with a host name")
        if parts.username or parts.password:
            raise WebhookURLError("credentials in the URL are not accepted; the signature "
                                  "authenticates the server to the receiver")
        allowed = self.allowed_hosts if parts.scheme == "https" else self.allowed_http_hosts
        if not _host_allowed(host, allowed):
            if parts.scheme == "http" and _host_allowed(host, self.allowed_hosts):
                raise WebhookURLError(f"{host} is allowed over https only")
            raise WebhookURLError(
                f"{host} is not a host this server posts webhooks to "
                f"(allowed: {', '.join(allowed) or 'none'}; the operator sets jobs.webhooks)")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return url
        if address.is_unspecified or address.is_multicast:
            raise WebhookURLError(f"{host} is not an address to post to")
        return url


def signed_headers(secret: str, message_id: str, body: bytes, timestamp: float | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` (and the JSON content type)."""
    when = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, tz=timezone.utc)
    signature = Webhook(secret).sign(message_id, when, body.decode("utf-8"))
    return {"webhook-id": message_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": signature, "content-type": "application/json"}


@dataclass
class Delivery:
    """How a webhook went: delivered or not, after how many attempts, the last status or error."""

    delivered: bool = False
    attempts: int = 0
    last: str = ""
    statuses: list[str] = field(default_factory=list)


async def deliver(url: str, body: bytes, secret: str, message_id: str, *, max_attempts: int = 5,
                  backoff_s: float = 1.0, timeout_s: float = 10.0,
                  client: httpx.AsyncClient | None = None) -> Delivery:
    """POST ``body`` to ``url``, signed, until a 2xx answer or ``max_attempts`` attempts; the
    wait doubles from ``backoff_s`` between attempts. Redirects are not followed (they could
    lead anywhere). Each attempt is signed afresh (a new timestamp), with the same id, so a
    receiver can drop duplicates."""
    delivery = Delivery()
    owned = client is None
    client = client or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
    try:
        for attempt in range(max_attempts):
            delivery.attempts = attempt + 1
            try:
                response = await client.post(url, content=body,
                                             headers=signed_headers(secret, message_id, body))
                delivery.last = str(response.status_code)
                if 200 <= response.status_code < 300:
                    delivery.delivered = True
                    delivery.statuses.append(delivery.last)
                    return delivery
            except httpx.HTTPError as exc:
                delivery.last = type(exc).__name__
            delivery.statuses.append(delivery.last)
            if attempt + 1 < max_attempts:
                await asyncio.sleep(backoff_s * 2**attempt)
        return delivery
    finally:
        if owned:
            await client.aclose()
