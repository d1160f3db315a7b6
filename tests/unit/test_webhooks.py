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
    delivery = asyncio.run(deliver(hook.url, body, SECRET, "msg_2", max_attempts=5, backoff_s=0.2))
    assert (delivery.delivered, delivery.attempts, delivery.statuses) == (True, 3, ["500", "503", "200"])
    times = [t for t, _, _ in hook.requests]
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4  # the wait doubles
    for _, headers, got in hook.requests:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert got == body and verify(SECRET, lowered, got) and lowered["webhook-id"] == "msg_2"


def test_attempts_are_bounded_and_redirects_are_not_followed(receiver):
    failing = receiver([500] * 10)
    delivery = asyncio.run(deliver(failing.url, b"{}", SECRET, "m", max_attempts=3, backoff_s=0.01))
    assert (delivery.delivered, delivery.attempts, len(failing.requests)) == (False, 3, 3)
    redirecting = receiver([302] * 10)
    delivery = asyncio.run(deliver(redirecting.url, b"{}", SECRET, "m", max_attempts=2, backoff_s=0.01))
    assert (delivery.delivered, delivery.statuses) == (False, ["302", "302"])


def test_an_unreachable_receiver_is_a_failed_delivery_not_an_error():
    delivery = asyncio.run(deliver("http://127.0.0.1:9/hook", b"{}", SECRET, "m", max_attempts=2,
                                   backoff_s=0.01, timeout_s=1))
    assert not delivery.delivered and delivery.attempts == 2 and delivery.last == "ConnectError"


@pytest.mark.parametrize("url, reason", [
    ("https://hooks.example.com/x", None),
    ("https://a.hooks.example.com/x", None),
    ("http://localhost:8080/x", None),
    ("https://evil.example.org/x", "not a host this server posts webhooks to"),
    ("https://hooks.example.com.evil.org/x", "not a host"),
    ("http://hooks.example.com/x", "over https only"),
    ("http://169.254.169.254/latest/meta-data", "not a host"),
    ("https://user:pw@hooks.example.com/x", "credentials"),
    ("ftp://hooks.example.com/x", "https:// URL"),
    ("https:///nohost", "https:// URL"),
])
def test_only_the_hosts_the_operator_allows(url, reason):
    policy = WebhookPolicy(allowed_hosts=("hooks.example.com", "*.hooks.example.com"),
                           allowed_http_hosts=("localhost", "127.0.0.1"))
    if reason is None:
        assert policy.check(url) == url
    else:
        with pytest.raises(WebhookURLError, match=reason):
            policy.check(url)
