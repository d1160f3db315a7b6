"""Webhooks (serve_app/jobs/webhooks.py): the signature checked by an implementation of the
Standard Webhooks specification written here from its text, deliveries to a real local HTTP
receiver (retries, backoff, a bounded number of attempts, no redirects), and the host policy."""

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_app.jobs.webhooks import WebhookPolicy, WebhookURLError, deliver, signed_headers

SECRET = "whsec_" + base64.b64encode(b"a secret of the operator, 32 bytes").decode()
# This machine's receivers, on any port (the tiny profile's policy, with every port).
LOCAL = WebhookPolicy(allowed_http_hosts=("localhost", "127.0.0.1"), allowed_ports=("1-65535",),
                      allowed_internal=("localhost", "127.0.0.1"))


def verify(secret: str, headers: dict, body: bytes, tolerance_s: int = 300) -> bool:
    """The spec's verification: HMAC-SHA256 over ``{id}.{timestamp}.{body}`` with the
    base64-decoded secret (after ``whsec_``), compared to each ``v1,`` signature."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    timestamp = headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    signed = f"{headers['webhook-id']}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, part.removeprefix("v1,"))
               for part in headers["webhook-signature"].split() if part.startswith("v1,"))


def test_the_signature_verifies_as_the_spec_defines_it():
    body = json.dumps({"id": "job_1", "status": "succeeded"}).encode()
    headers = signed_headers(SECRET, "msg_1", body)
    assert headers["webhook-id"] == "msg_1" and headers["webhook-signature"].startswith("v1,")
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body + b" ")
    other = "whsec_" + base64.b64encode(b"another secret").decode()
    assert not verify(other, headers, body)
    old = signed_headers(SECRET, "msg_1", body, timestamp=time.time() - 3600)
    assert not verify(SECRET, old, body)  # a replayed, old delivery


class Receiver:
    """A webhook receiver on this machine: answers each POST with the next status of
    ``answers`` (a redirect points at a cloud metadata address), then 200."""

    def __init__(self, answers=()):
        self.answers, self.requests = list(answers), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append((time.monotonic(), headers, body))
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                if status in (301, 302, 307):
                    self.send_header("location", "http://169.254.169.254/latest/meta-data")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def received(self) -> list[tuple[dict, bytes]]:
        return [(headers, body) for _, headers, body in self.requests]

    def wait(self, count, timeout_s=60):
        """What was received once ``count`` POSTs came, or the time is up."""
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.received

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver(request):
    made = []

    def make(answers):
        made.append(Receiver(answers))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt_with_backoff(receiver):
    hook = receiver([500, 503])
    body = b'{"id": "job_2"}'
    delivery = asyncio.run(deliver(hook.url, body, SECRET, "msg_2", policy=LOCAL, max_attempts=5,
                                   backoff_s=0.2))
    assert (delivery.delivered, delivery.attempts, delivery.statuses) == (True, 3, ["500", "503", "200"])
    times = [t for t, _, _ in hook.requests]
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4  # the wait doubles
    for _, headers, got in hook.requests:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert got == body and verify(SECRET, lowered, got) and lowered["webhook-id"] == "msg_2"


def test_attempts_are_bounded_and_redirects_are_not_followed(receiver):
    failing = receiver([500] * 10)
    delivery = asyncio.run(deliver(failing.url, b"{}", SECRET, "m", policy=LOCAL, max_attempts=3,
                                   backoff_s=0.01))
    assert (delivery.delivered, delivery.attempts, len(failing.requests)) == (False, 3, 3)
    redirecting = receiver([302] * 10)
    delivery = asyncio.run(deliver(redirecting.url, b"{}", SECRET, "m", policy=LOCAL, max_attempts=2,
                                   backoff_s=0.01))
    assert (delivery.delivered, delivery.statuses) == (False, ["302", "302"])


def test_an_unreachable_receiver_is_a_failed_delivery_not_an_error():
    delivery = asyncio.run(deliver("http://127.0.0.1:9/hook", b"{}", SECRET, "m", policy=LOCAL,
                                   max_attempts=2, backoff_s=0.01, timeout_s=1))
    assert not delivery.delivered and delivery.attempts == 2 and delivery.last == "ConnectError"


@pytest.mark.parametrize("url, reason", [
    ("https://hooks.example.com/x", None),
    ("https://a.hooks.example.com/x", None),
    ("http://localhost/x", None),
    ("https://hooks.example.com:443/x", None),
    ("http://localhost:8080/x", "port 8080 is not one"),
    ("https://hooks.example.com:8443/x", "port 8443 is not one"),
    ("http://127.0.0.1/x", "127.0.0.1 is a loopback address"),
    ("https://evil.example.org/x", "not a host this server posts webhooks to"),
    ("https://hooks.example.com.evil.org/x", "not a host"),
    ("http://hooks.example.com/x", "over https only"),
    ("http://169.254.169.254/latest/meta-data", "not a host"),
    ("https://user:pw@hooks.example.com/x", "credentials"),
    ("ftp://hooks.example.com/x", "https:// URL"),
    ("https:///nohost", "https:// URL"),
    ("https://hooks.example.com\\@evil.example.org/x", "credentials"),  # as httpx reads it
    ("https://hooks.example.com:443@evil.example.org/x", "credentials"),
    ("https://hooks.example.com:99999/x", "port 99999"),
    ("https://hooks.example.com:x/x", "not a URL"),
])
def test_only_the_hosts_the_operator_allows(url, reason):
    policy = WebhookPolicy(allowed_hosts=("hooks.example.com", "*.hooks.example.com"),
                           allowed_http_hosts=("localhost", "127.0.0.1"))
    if reason is None:
        assert policy.check(url) == url
    else:
        with pytest.raises(WebhookURLError, match=reason):
            policy.check(url)


# --- delivery: the policy again, the resolved address, the ports, the time and size bounds


def resolving(monkeypatch, names: dict[str, str]):
    """``socket.getaddrinfo`` answering ``names`` (a host name to an address) and every other
    name as the system does: a resolver made deterministic, as a rebinding DNS server would be."""
    import socket

    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in names:
            return real(names[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_name_resolving_to_loopback_is_refused_unless_listed(receiver, monkeypatch):
    """hooks.test is an allowed host name, but resolves to 127.0.0.1: refused at delivery
    without a connection, unless allowed_internal lists the address's network or the name;
    then the connection goes to the address checked, with the name in the Host header."""
    resolving(monkeypatch, {"hooks.test": "127.0.0.1"})
    hook = receiver([])
    url = hook.url.replace("127.0.0.1", "hooks.test")
    public_only = WebhookPolicy(allowed_http_hosts=("hooks.test",), allowed_ports=("1-65535",))
    assert public_only.check(url) == url  # the name passes: only its address is internal
    delivery = asyncio.run(deliver(url, b"{}", SECRET, "m", policy=public_only, max_attempts=3,
                                   backoff_s=0.01))
    assert (delivery.delivered, delivery.refused, delivery.attempts) == (False, True, 1)
    assert "resolves to 127.0.0.1, which is a loopback address" in delivery.last
    assert hook.requests == []
    for listed in ("127.0.0.0/8", "hooks.test"):
        policy = WebhookPolicy(allowed_http_hosts=("hooks.test",), allowed_ports=("1-65535",),
                               allowed_internal=(listed,))
        delivery = asyncio.run(deliver(url, b"{}", SECRET, "m", policy=policy, max_attempts=1))
        assert delivery.delivered, (listed, delivery)
    assert [headers["host"] for _, headers, _ in hook.requests] == [
        f"hooks.test:{hook.server.server_port}"] * 2


def test_a_name_rebound_to_an_internal_address_is_refused_at_the_connection(receiver, monkeypatch):
    """The same name, resolving to a public address when the URL was checked and to a private
    one when the connection is made: the connection's own resolution is what is checked."""
    hook = receiver([])
    url = hook.url.replace("127.0.0.1", "rebind.test")
    policy = WebhookPolicy(allowed_http_hosts=("rebind.test",), allowed_ports=("1-65535",),
                           allowed_internal=("10.0.0.0/8",))
    resolving(monkeypatch, {"rebind.test": "93.184.216.34"})
    assert policy.check(url) == url
    resolving(monkeypatch, {"rebind.test": "169.254.169.254"})
    delivery = asyncio.run(deliver(url, b"{}", SECRET, "m", policy=policy, max_attempts=2,
                                   backoff_s=0.01))
    assert delivery.refused and "link-local" in delivery.last and hook.requests == []


@pytest.mark.parametrize("address, kind", [
    ("0.0.0.0", "unspecified"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("224.0.0.1", "multicast"),
    ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("fd00::1", "private"),
    ("240.0.0.1", "reserved"), ("::ffff:127.0.0.1", "loopback"), ("100.64.0.1", "non-global"),
    ("93.184.216.34", None), ("2606:4700::1111", None),
])
def test_internal_addresses_are_named(address, kind):
    import ipaddress

    from serve_app.jobs.webhooks import internal_kind

    assert internal_kind(ipaddress.ip_address(address)) == kind


def test_a_port_not_listed_is_refused_before_any_connection(receiver):
    hook = receiver([])
    policy = WebhookPolicy(allowed_http_hosts=("127.0.0.1",), allowed_internal=("127.0.0.1",))
    delivery = asyncio.run(deliver(hook.url, b"{}", SECRET, "m", policy=policy))
    assert delivery.refused and f"port {hook.server.server_port} is not one" in delivery.last
    assert delivery.attempts == 0 and hook.requests == []
    listed = WebhookPolicy(allowed_http_hosts=("127.0.0.1",), allowed_internal=("127.0.0.1",),
                           allowed_ports=(80, 443, hook.server.server_port))
    assert asyncio.run(deliver(hook.url, b"{}", SECRET, "m", policy=listed)).delivered


class RawReceiver:
    """A receiver on a bare socket, answering every connection with ``answer(connection)``
    after reading the request's head; counts the bytes it managed to send."""

    def __init__(self, answer):
        import socket

        self.sent, self.connections, self.answer = 0, 0, answer
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(connection,), daemon=True).start()

    def _one(self, connection):
        with connection:
            try:
                connection.recv(65536)
                self.answer(self, connection)
            except OSError:
                pass  # the server hung up on us: what the bounds are for

    def close(self):
        self.server.close()


def test_a_trickling_receiver_is_cut_at_the_attempts_whole_time():
    """One byte a second: every read is quick, so only a bound on the whole attempt ends it."""
    def trickle(receiver, connection):
        for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" * 100:
            connection.sendall(bytes([byte]))
            receiver.sent += 1
            time.sleep(1.0)

    hook = RawReceiver(trickle)
    started = time.monotonic()
    delivery = asyncio.run(deliver(hook.url, b"{}", SECRET, "m", policy=LOCAL, max_attempts=2,
                                   backoff_s=0.1, timeout_s=2.5))
    took = time.monotonic() - started
    hook.close()
    assert (delivery.delivered, delivery.statuses) == (False, ["TimeoutError", "TimeoutError"])
    assert 5.0 <= took < 8.0, took  # two attempts of 2.5 s, and the wait between them


def test_a_slow_resolver_is_cut_at_the_attempts_whole_time(monkeypatch):
    import socket

    real = socket.getaddrinfo

    def slow(host, *args, **kwargs):
        time.sleep(4)
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    policy = WebhookPolicy(allowed_http_hosts=("slow.test",), allowed_ports=("1-65535",))

    async def timed():
        started = time.monotonic()
        delivery = await deliver("http://slow.test:9/hook", b"{}", SECRET, "m", policy=policy,
                                 max_attempts=1, timeout_s=1.0)
        return delivery, time.monotonic() - started

    delivery, took = asyncio.run(timed())
    assert delivery.last == "TimeoutError" and took < 2.0, (delivery, took)


def test_a_huge_answer_is_not_read_whole():
    """A 2xx answer announcing a gigabyte: a few KB of it are read, then the connection is
    closed; the receiver cannot push more than the socket buffers hold."""
    def huge(receiver, connection):
        connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n")
        chunk = b"x" * 65536
        while receiver.sent < 1_000_000_000:
            connection.sendall(chunk)
            receiver.sent += len(chunk)

    hook = RawReceiver(huge)
    started = time.monotonic()
    delivery = asyncio.run(deliver(hook.url, b"{}", SECRET, "m", policy=LOCAL, timeout_s=30))
    took = time.monotonic() - started
    time.sleep(0.5)  # the receiver's last sendall fails once the connection is gone
    hook.close()
    assert delivery.delivered and delivery.statuses == ["200"] and took < 5, (delivery, took)
    assert hook.sent < 64_000_000, hook.sent  # kernel buffers at most; never the gigabyte


def test_each_api_key_signs_with_its_own_secret(receiver, monkeypatch):
    """Webhooks of a key listed in key_secrets are signed with its secret (a receiver of one
    tenant cannot be sent another's jobs with a valid signature); other keys, and callers
    without a key, get the server's secret."""
    from serve_app.config import WebhooksConfig
    from serve_app.protocol.keys import owner_of
    from serve_app.jobs.webhooks import Webhooks

    tenant = "whsec_" + base64.b64encode(b"the secret of one tenant").decode()
    hook = receiver([])
    config = WebhooksConfig(allowed_http_hosts=["127.0.0.1"], allowed_internal=["127.0.0.1"],
                            allowed_ports=["1024-65535"], secret=SECRET,
                            key_secrets={owner_of(b"sk-tenant"): "${TENANT_WEBHOOK_SECRET}"})
    with pytest.raises(ValueError, match=r"key_secrets\[.*not a signing secret"):
        Webhooks(config, environ={})  # its ${VAR} not set: refused when the replica starts
    monkeypatch.setenv("TENANT_WEBHOOK_SECRET", tenant)
    webhooks = Webhooks(config, environ={})
    for owner in (owner_of(b"sk-tenant"), owner_of(b"sk-other"), ""):
        assert asyncio.run(webhooks.deliver(hook.url, b"{}", owner, "msg_k")).delivered
    (tenant_headers, body), (other_headers, _), (anonymous_headers, _) = hook.received
    assert verify(tenant, tenant_headers, body) and not verify(SECRET, tenant_headers, body)
    assert verify(SECRET, other_headers, body) and verify(SECRET, anonymous_headers, body)
    assert Webhooks(WebhooksConfig(), environ={}).secret_for(owner_of(b"sk-tenant")) is None


def test_a_policy_changed_after_submit_is_the_one_enforced_at_delivery(tiny_args, tmp_path, receiver):
    """A job submitted while its webhook's host was allowed, ended by a consumer whose config
    no longer allows it (or read from a record nobody checked): the consumer checks again and
    posts nothing; the job still ends, its webhook handled (given up), its lease dropped."""
    from celery import Celery

    from serve_app.jobs.store import JobStore
    from serve_app.jobs.webhooks import Webhooks
    from tests.unit.test_jobs import record, runner_for

    store = JobStore(Celery("t", backend=f"file://{tmp_path}").backend)
    hook = receiver([])
    submitted_under = Webhooks(runner_for(tiny_args, store).config.jobs.webhooks)
    assert submitted_under.policy.check(hook.url) == hook.url
    for changed in ({"allowed_http_hosts": ["hooks.example.com"]},  # the host taken off
                    {"allowed_ports": [80, 443]},                    # its port taken off
                    {"allowed_internal": []}):                       # loopback no longer listed
        runner = runner_for(tiny_args, store, **changed)
        job = record(webhook=hook.url)
        store.put(job)

        async def run_then_wait():
            status = await runner.handle_delivery(job.id)
            await asyncio.gather(*runner.deliveries)
            return status

        assert asyncio.run(run_then_wait()) == "succeeded"
        assert store.get(job.id).notified and job.id not in store.leases(), changed
    assert hook.requests == []
    runner = runner_for(tiny_args, store)  # the policy it was submitted under: posted
    job = record(webhook=hook.url)
    store.put(job)

    async def run_then_wait():
        await runner.handle_delivery(job.id)
        await asyncio.gather(*runner.deliveries)

    asyncio.run(run_then_wait())
    assert len(hook.requests) == 1


@pytest.mark.parametrize("field, value, message", [
    ("allowed_ports", [0], "expected 1-65535"),
    ("allowed_ports", ["9000-8000"], "low <= high"),
    ("allowed_ports", ["http"], "a number or 'low-high'"),
    ("allowed_internal", ["10.0.0.0/33"], "a network"),
    ("allowed_internal", ["not a host!"], "a network"),
    ("key_secrets", {"sk-live-123": "whsec_AAAA"}, "SHA-256"),
])
def test_the_webhooks_config_refuses_what_it_cannot_use(field, value, message):
    from pydantic import ValidationError

    from serve_app.config import WebhooksConfig

    with pytest.raises(ValidationError, match=message):
        WebhooksConfig(**{field: value})
    assert WebhooksConfig().allowed_ports == [80, 443] and WebhookPolicy().allowed_ports == (80, 443)
