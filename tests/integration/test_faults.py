"""Faults of the server are answered as the server's: a 5xx ``server_error`` naming the cause,
never a 400 that blames the client, and never a wait until the request times out.

The faults app (faults.yaml) runs beside the tiny app: a configured LoRA adapter whose folder
is not on the server, an on-demand upscaler whose weights file is not on the server, and a
model whose start-up LoRA load fails (it never starts, and ``/health`` says why).
"""

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration

CONFIG = REPO_ROOT / "tests" / "integration" / "faults.yaml"
TIMEOUT_S = 60  # the faults app's request_timeout_s


@pytest.fixture(scope="module")
def faults_url(base_url):
    with side_app(CONFIG, base_url, healthy=False) as url:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the working model is up; broken-loras never is
            models = httpx.get(f"{url}/v1/models", timeout=10)
            ready = httpx.post(f"{url}/v1/images/generations", timeout=120,
                               json={"prompt": "warm up", "n": 1}) if models.status_code == 200 else None
            if ready is not None and ready.status_code == 200:
                break
            time.sleep(2)
        else:
            pytest.fail("the faults app's working model did not answer")
        yield url


def envelope(response):
    body = response.json()
    assert set(body) == {"error"}
    return body["error"]


def test_a_configured_adapter_missing_on_the_server_is_a_500_and_the_others_work(faults_url):
    from openai import InternalServerError, OpenAI

    client = OpenAI(base_url=f"{faults_url}/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(InternalServerError) as info:
        client.images.generate(prompt="a lighthouse", extra_body={"loras": {"ghost": 1.0}})
    assert info.value.status_code == 500
    error = info.value.body
    assert (error["type"], error["code"]) == ("server_error", "lora_unavailable")
    assert "'ghost'" in error["message"] and "fault of the server" in error["message"]
    assert "Traceback" not in error["message"]
    # The replica goes on: the same model with the adapter it has, and without any.
    inked = client.images.generate(prompt="a lighthouse", extra_body={"loras": {"ink": 1.0}, "seed": 3})
    plain = client.images.generate(prompt="a lighthouse", extra_body={"seed": 3})
    assert inked.data[0].b64_json != plain.data[0].b64_json


def test_an_upscaler_whose_weights_are_missing_answers_503_naming_the_cause_not_a_timeout(faults_url):
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buffer, format="PNG")
    started = time.monotonic()
    response = httpx.post(f"{faults_url}/v1/images/upscale", data={"model": "esrgan-x2"},
                          files={"image": ("in.png", buffer.getvalue(), "image/png")}, timeout=120)
    waited = time.monotonic() - started
    assert response.status_code == 503, response.text
    error = envelope(response)
    assert (error["type"], error["code"]) == ("server_error", "model_unavailable")
    assert "The model 'esrgan-x2' cannot start" in error["message"]
    assert "FileNotFoundError" in error["message"] and "RealESRGAN_x2plus.pth" in error["message"]
    assert response.headers["Retry-After"] == "7"
    assert waited < TIMEOUT_S / 2, f"answered after {waited:.0f} s"


def test_a_model_whose_lora_stack_fails_at_start_never_starts_and_health_says_why(faults_url):
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        health = httpx.get(f"{faults_url}/health", timeout=10)
        if "broken-loras" in health.json().get("failures", {}):
            break
        time.sleep(3)
    assert health.status_code == 503
    cause = health.json()["failures"]["broken-loras"]
    assert cause.startswith("LoraStackError: broken-loras: LoRA adapter 'ghost' cannot be loaded at start")
    assert "no such file or folder" in cause
    response = httpx.post(f"{faults_url}/v1/images/generations", timeout=120,
                          json={"model": "broken-loras", "prompt": "a fox"})
    assert response.status_code == 503
    error = envelope(response)
    assert (error["type"], error["code"]) == ("server_error", "model_unavailable")
    assert "LoraStackError" in error["message"]
