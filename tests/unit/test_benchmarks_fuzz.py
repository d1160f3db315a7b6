"""benchmarks/fuzz.py's parts that need no server: its reproductions send the request that
failed, byte for byte, to the address the results name; its error-shape check tells the
routes' shapes apart; its cheap values keep invalid values. The run itself is
tests/integration/test_fuzz.py's (the script's smoke run against the session's app)."""

import base64
import shlex
import subprocess
import types

import pytest

from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def fuzz():
    return benchmark_module("fuzz")


def recorded(body, content_type="application/json"):
    """A request as schemathesis records it (engine/recorder.py: Request)."""
    return types.SimpleNamespace(
        method="POST", uri="http://127.0.0.1:45678/v1/images/edits?x=1", body=body,
        headers={"Content-Type": [content_type], "User-Agent": ["schemathesis"],
                 "X-Schemathesis-TestCaseId": ["abc"], "Idempotency-Key": ["k 1"]})


def sent_body(command: str) -> bytes:
    """What ``command`` would send as the body: its curl replaced by a printer of stdin or
    of its --data-binary argument."""
    pipeline, _, curl = command.rpartition("| ")
    words = shlex.split(curl)
    assert words[0] == "curl"
    data = words[words.index("--data-binary") + 1]
    if data == "@-":
        return subprocess.run(f"{pipeline}| cat", shell=True, capture_output=True, check=True).stdout
    return data.encode()


@pytest.mark.parametrize("body", [
    b'{"prompt": "it\'s a \\"test\\"", "n": 1}',
    b"--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n\x89PNG\r\n\x1a\n\x00\xff\r\n--b--\r\n",
])
def test_a_reproduction_sends_the_same_bytes_to_the_shown_address(fuzz, body):
    command = fuzz.reproduction(recorded(body), "http://127.0.0.1:45678", "http://127.0.0.1:8000")
    assert sent_body(command) == body
    words = shlex.split(command.rpartition("| ")[2])
    assert words[-1] == "http://127.0.0.1:8000/v1/images/edits?x=1"
    headers = [words[i + 1] for i, word in enumerate(words) if word == "-H"]
    assert headers == ["Content-Type: application/json", "Idempotency-Key: k 1"]
    if b"\x00" in body:
        assert base64.b64encode(body).decode() in command  # binary: through base64


def test_a_reproduction_without_a_body(fuzz):
    request = types.SimpleNamespace(method="DELETE", uri="http://h:1/health", body=None, headers={})
    assert fuzz.reproduction(request, "http://h:1", "http://127.0.0.1:8000") == \
        "curl -sS -i -X DELETE http://127.0.0.1:8000/health"


def answer(status, body):
    return types.SimpleNamespace(status_code=status, json=lambda: body, text=str(body))


@pytest.mark.parametrize("path, status, body, fits", [
    ("/v1/images/generations", 400, {"error": {"message": "Invalid 'n'", "type": "invalid_request_error",
                                               "param": "n", "code": None}}, True),
    ("/v1/images/generations", 400, {"error": {"message": "", "type": "x", "param": None, "code": None}}, False),
    ("/v1/images/generations", 422, {"detail": [{"loc": ["body", "n"], "msg": "m", "type": "t"}]}, False),
    ("/text-to-image", 422, {"detail": [{"loc": ["body", "n"], "msg": "m", "type": "t"}]}, True),
    ("/text-to-image/", 400, {"detail": {"msg": "model_id: unknown"}}, True),
    ("/text-to-image", 400, {"error": {"message": "m", "type": "t", "param": None, "code": None}}, False),
    ("/upscale", 413, {"detail": {"msg": "too large"}}, True),
    ("/v1/models", 200, {"object": "list"}, True),
])
def test_the_error_shape_check(fuzz, path, status, body, fits):
    case = types.SimpleNamespace(path=path)
    if fits:
        fuzz.error_envelope(None, answer(status, body), case)
    else:
        with pytest.raises(AssertionError):
            fuzz.error_envelope(None, answer(status, body), case)


def test_cheap_values_bring_down_only_valid_costly_ones(fuzz):
    assert fuzz.cheap({"n": 9, "num_inference_steps": 50}) == {"n": 2, "num_inference_steps": 3}
    assert fuzz.cheap({"n": 0, "num_inference_steps": 10**6, "seed": 9}) == \
        {"n": 0, "num_inference_steps": 10**6, "seed": 9}  # invalid: kept, they are the point
    assert fuzz.cheap({"prompt": "x"}, "/text-to-image") == \
        {"prompt": "x", "num_inference_steps": 3, "width": 256, "height": 256}
