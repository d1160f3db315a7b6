"""Webhooks when a job ends, per the Standard Webhooks specification
(https://www.standardwebhooks.com): ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``), signed with the
``standardwebhooks`` library (the secret of the job's API key, else the server's); posted with
retries and exponential backoff on anything but a 2xx, a bounded number of times; only to
hosts and ports the operator allows, and only to the address checked when the host name was
resolved for that attempt (a name that resolves to an internal address is refused unless
the operator lists it).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache

import httpcore
import httpx
from standardwebhooks import Webhook

from serve_app.config import WebhooksConfig

# The signing secret when the config gives none ("whsec_" + base64).
WEBHOOK_SECRET_ENV = "SERVE_APP_WEBHOOK_SECRET"
_DEFAULTS = WebhooksConfig()


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


def _port_ranges(entries) -> tuple[tuple[int, int], ...]:
    """``[80, "8000-8099"]`` as ``((80, 80), (8000, 8099))`` (validated by the config)."""
    ranges = []
    for entry in entries:
        low, _, high = str(entry).partition("-")
        ranges.append((int(low), int(high or low)))
    return tuple(ranges)


def internal_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes ``address`` one not to post to unless the operator lists it (loopback,
    private, ...), or None for a public address. An IPv4 address mapped into IPv6 is judged
    as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-global"


@dataclass(frozen=True)
class WebhookPolicy:
    """Where webhooks may go: https to ``allowed_hosts`` (exact names, or ``*.domain``), and
    plain http only to ``allowed_http_hosts`` (the tiny profile's localhost); only on
    ``allowed_ports``; and only to public addresses, save the networks and host names in
    ``allowed_internal``. The names are checked in the URL (:meth:`check`, at submit and
    again before posting), the addresses they resolve to when a connection is made
    (:meth:`addresses`): so a client cannot make the server probe its own network, neither
    by naming an internal host nor by a name that resolves to one."""

    allowed_hosts: tuple[str, ...] = ()
    allowed_http_hosts: tuple[str, ...] = ()
    allowed_ports: tuple[int | str, ...] = tuple(_DEFAULTS.allowed_ports)
    allowed_internal: tuple[str, ...] = tuple(_DEFAULTS.allowed_internal)

    @classmethod
    def of(cls, config: WebhooksConfig) -> WebhookPolicy:
        return cls(tuple(config.allowed_hosts), tuple(config.allowed_http_hosts),
                   tuple(config.allowed_ports), tuple(config.allowed_internal))

    def check(self, url: str) -> str:
        """``url`` if a webhook may be posted there; else :class:`WebhookURLError`. Read with
        httpx's own parser, the one the delivery uses: a URL two parsers read differently
        (``http://allowed\\@elsewhere/``) is judged by where it would really go."""
        if len(url) > 2048:
            raise WebhookURLError("the URL is longer than 2048 characters")
        try:
            parts = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise WebhookURLError(f"not a URL: {exc}") from None
        host = parts.host.lower()
        names = (host, parts.raw_host.decode("ascii", "replace").lower())  # as written, as IDNA
        if parts.scheme not in ("https", "http") or not host:
            raise WebhookURLError("expected an https:// URL with a host name")
        if parts.userinfo:
            raise WebhookURLError("credentials in the URL are not accepted; the signature "
                                  "authenticates the server to the receiver")
        allowed = self.allowed_hosts if parts.scheme == "https" else self.allowed_http_hosts
        if not any(_host_allowed(name, allowed) for name in names):
            if parts.scheme == "http" and any(_host_allowed(n, self.allowed_hosts) for n in names):
                raise WebhookURLError(f"{host} is allowed over https only")
            raise WebhookURLError(
                f"{host} is not a host this server posts webhooks to "
                f"(allowed: {', '.join(allowed) or 'none'}; the operator sets jobs.webhooks)")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if not any(low <= port <= high for low, high in _port_ranges(self.allowed_ports)):
            raise WebhookURLError(
                f"port {port} is not one this server posts webhooks to (allowed: "
                f"{', '.join(map(str, self.allowed_ports)) or 'none'}; jobs.webhooks.allowed_ports)")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return url
        self.check_address(host, address)
        return url

    def check_address(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """Raise :class:`WebhookURLError` if ``host``, resolved to ``address``, may not be
        posted to: an internal address neither its network nor ``host`` is listed for."""
        kind = internal_kind(address)
        if kind is None:
            return
        for entry in self.allowed_internal:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if _host_allowed(host, (entry,)):
                    return
                continue
            if address in network or (isinstance(address, ipaddress.IPv6Address)
                                       and address.ipv4_mapped in network):
                return
        shown = host if str(address) == host else f"{host} resolves to {address}, which"
        raise WebhookURLError(f"{shown} is a {kind} address, not one this server posts "
                              "webhooks to (unless jobs.webhooks.allowed_internal lists it)")

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses ``host`` resolves to now, in the resolver's order, that may be posted
        to; :class:`WebhookURLError` if it resolves to none of them, httpcore's ConnectError
        (a failed attempt, tried again) if it does not resolve."""
        try:
            # asyncio's (in a thread, but its wait cancellable: the attempt's bound holds)
            infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                                 type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"resolving {host}: {exc}") from exc
        allowed, refused = [], None
        for *_, sockaddr in infos:
            text = str(sockaddr[0]).partition("%")[0]
            try:
                self.check_address(host, ipaddress.ip_address(text))
            except WebhookURLError as exc:
                refused = refused or exc
                continue
            if text not in allowed:
                allowed.append(text)
        if not allowed:
            raise refused or WebhookURLError(f"{host} resolves to no address")
        return allowed


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend (anyio's) that resolves a host itself, checks its addresses
    against the policy and connects to a checked one: the check and the connection see the
    same address, so a name that resolves differently the second time (DNS rebinding)
    cannot lead elsewhere. httpcore still starts TLS with the URL's host name (SNI and
    certificate checks), and httpx sends it as the Host header."""

    def __init__(self, policy: WebhookPolicy):
        self.policy, self.inner = policy, httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        failure = None
        for address in await self.policy.addresses(host, port):
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout,
                                                    local_address=local_address,
                                                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise WebhookURLError("webhooks are not posted to Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """The system's (certifi's) CAs, loaded once per process, not once per delivery."""
    return httpx.create_ssl_context(trust_env=False)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with :class:`_PinnedBackend` under its connection pool. httpx takes no
    network backend of its own; its transport is a thin layer over an httpcore pool, which
    does, so the pool is made here with the same TLS context."""

    def __init__(self, policy: WebhookPolicy):
        super().__init__(verify=_ssl_context(), trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(ssl_context=_ssl_context(), max_connections=4,
                                                  network_backend=_PinnedBackend(policy))


def signed_headers(secret: str, message_id: str, body: bytes, timestamp: float | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` (and the JSON content type)."""
    when = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, tz=timezone.utc)
    signature = Webhook(secret).sign(message_id, when, body.decode("utf-8"))
    return {"webhook-id": message_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": signature, "content-type": "application/json"}


@dataclass
class Delivery:
    """How a webhook went: delivered or not, after how many attempts, the last status or
    error; ``refused`` when the policy stopped it (no attempt is made, or none more)."""

    delivered: bool = False
    attempts: int = 0
    last: str = ""
    statuses: list[str] = field(default_factory=list)
    refused: bool = False


async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str],
                max_response_bytes: int) -> int:
    """POST, then read at most ``max_response_bytes`` of the answer (raw, never decompressed)
    and close the connection: a receiver cannot make the server hold a huge answer."""
    async with client.stream("POST", url, content=body, headers=headers) as response:
        read = 0
        if max_response_bytes:
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= max_response_bytes:
                    break
        return response.status_code


async def deliver(url: str, body: bytes, secret: str, message_id: str, *, policy: WebhookPolicy,
                  max_attempts: int = 5, backoff_s: float = 1.0, timeout_s: float = 10.0,
                  max_response_bytes: int = _DEFAULTS.max_response_bytes) -> Delivery:
    """POST ``body`` to ``url``, signed, until a 2xx answer or ``max_attempts`` attempts; the
    wait doubles from ``backoff_s`` between attempts. ``url`` is checked against ``policy``
    first, and each attempt connects only to an address of its host the policy allows (a
    refusal ends the delivery: no retry). Each attempt is bounded in all by ``timeout_s``
    (a receiver trickling its answer is cut off), and reads at most ``max_response_bytes``
    of the answer. Redirects are not followed (they could lead anywhere); proxies in the
    environment are not used (they would connect in the policy's place). Each attempt is
    signed afresh (a new timestamp), with the same id, so a receiver can drop duplicates."""
    delivery = Delivery()
    try:
        policy.check(url)
    except WebhookURLError as exc:
        delivery.last, delivery.refused = f"refused: {exc}", True
        return delivery
    async with httpx.AsyncClient(transport=PinnedTransport(policy), timeout=timeout_s,
                                 follow_redirects=False, trust_env=False) as client:
        for attempt in range(max_attempts):
            delivery.attempts = attempt + 1
            try:
                async with asyncio.timeout(timeout_s):
                    status = await _post(client, url, body, signed_headers(secret, message_id, body),
                                         max_response_bytes)
                delivery.last = str(status)
                if 200 <= status < 300:
                    delivery.delivered = True
                    delivery.statuses.append(delivery.last)
                    return delivery
            except WebhookURLError as exc:
                delivery.last, delivery.refused = f"refused: {exc}", True
                delivery.statuses.append("refused")
                return delivery
            except (httpx.HTTPError, TimeoutError) as exc:
                delivery.last = type(exc).__name__
            delivery.statuses.append(delivery.last)
            if attempt + 1 < max_attempts:
                await asyncio.sleep(backoff_s * 2**attempt)
        return delivery


class Webhooks:
    """A server's webhooks, from its config (``jobs.webhooks``): the policy, the signing
    secrets, and delivery under both. Read when a replica starts: the consumer checks the
    policy it has then, not the one a job was submitted under."""

    def __init__(self, config: WebhooksConfig, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.config, self.policy = config, WebhookPolicy.of(config)
        secret = config.secret.get_secret_value() if config.secret else None
        self.secret = secret or environ.get(WEBHOOK_SECRET_ENV) or None
        self.key_secrets = {digest: os.path.expandvars(value.get_secret_value())
                            for digest, value in config.key_secrets.items()}
        for name, value in [("secret", self.secret)] + [
                (f"key_secrets[{digest[:12]}...]", v) for digest, v in self.key_secrets.items()]:
            try:
                if value is not None and not base64.b64decode(value.removeprefix("whsec_"),
                                                              validate=True):
                    raise ValueError("empty")
            except ValueError:
                raise ValueError(f"jobs.webhooks.{name} is not a signing secret ('whsec_' + "
                                 "base64; a ${VAR} not set in the environment?)") from None

    def secret_for(self, owner: str) -> str | None:
        """The secret signing the webhooks of ``owner``'s jobs (an API key's SHA-256, as the
        job record keeps it): the key's own, else the server's; None: no webhooks."""
        return self.key_secrets.get(owner) or self.secret

    async def deliver(self, url: str, body: bytes, owner: str, message_id: str) -> Delivery:
        secret = self.secret_for(owner)
        if not secret:
            return Delivery(last="refused: no signing secret", refused=True)
        hooks = self.config
        return await deliver(url, body, secret, message_id, policy=self.policy,
                             max_attempts=hooks.max_attempts, backoff_s=hooks.backoff_s,
                             timeout_s=hooks.timeout_s, max_response_bytes=hooks.max_response_bytes)
