"""Faults of the server are answered as the server's: a 5xx ``server_error`` naming the cause,
never a 400 that blames the client, and never a wait until the request times out.

The faults app (faults.yaml) runs beside the tiny app: a configured LoRA adapter whose folder
is not on the server, an on-demand upscaler whose weights file is not on the server, and a
model whose start-up LoRA load fails (it never starts, and ``/health`` says why). Its working
model's replica is killed under a request, plain and streamed: the request runs again on the
replica Serve starts in its place, and answers the same pixels as an undisturbed one.
"""

import base64
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration

CONFIG = REPO_ROOT / "tests" / "integration" / "faults.yaml"
TIMEOUT_S = 120  # the faults app's request_timeout_s


@pytest.fixture(scope="module")
def faults_url(base_url):
    with side_app(CONFIG, base_url, healthy=False) as url:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the working model is up; broken-loras never is
            try:
                models = httpx.get(f"{url}/v1/models", timeout=10)
                ready = httpx.post(f"{url}/v1/images/generations", timeout=120,
                                   json={"prompt": "warm up", "n": 1}) if models.status_code == 200 else None
            except httpx.TimeoutException:  # the app still deploying on a busy machine
                ready = None
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
                          files={"image": ("in.png", buffer.getvalue(), "image/png")}, timeout=TIMEOUT_S + 30)
    waited = time.monotonic() - started
    assert response.status_code == 503, response.text
    error = envelope(response)
    assert (error["type"], error["code"]) == ("server_error", "model_unavailable")
    assert "The model 'esrgan-x2' cannot start" in error["message"]
    assert "FileNotFoundError" in error["message"] and "RealESRGAN_x2plus.pth" in error["message"]
    assert response.headers["Retry-After"] == "7"
    # Serve gives up after three starts (a new worker importing torch each: 10-15 s on two busy
    # cores); the answer comes then, well before the request's timeout.
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


# Long enough (150 tiny steps) that the replica is killed while it denoises.
LONG = {"prompt": "a lighthouse", "size": "256x256", "num_inference_steps": 150, "seed": 12}
MODEL = "stable-diffusion-2-1"


def model_replicas() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::faults#{MODEL}#")]


def kill(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def logged_retry(request_id: str, timeout_s: float = 20) -> bool:
    """Whether the faults app's ingress logged running ``request_id`` again after a loss."""
    import ray
    from pathlib import Path

    folder = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in folder.glob("replica_faults_ImagesIngress_*.log"):
            if any(request_id in line and "running the request again" in line
                   for line in path.read_text(errors="replace").splitlines()):
                return True
        time.sleep(0.5)
    return False


def test_a_model_replica_killed_under_a_request_is_run_again_with_the_same_pixels(faults_url):
    url = f"{faults_url}/v1/images/generations"
    started = time.monotonic()
    undisturbed = httpx.post(url, json=LONG, timeout=120)
    took = time.monotonic() - started
    assert undisturbed.status_code == 200, undisturbed.text
    (victim,) = model_replicas()
    request_id = f"killed-{uuid.uuid4()}"
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, url, json=LONG, headers={"x-request-id": request_id},
                             timeout=120)
        time.sleep(took / 2)  # the request is on the replica, denoising
        kill(victim)
        response = answer.result()
    assert response.status_code == 200, response.text
    assert victim not in model_replicas()
    assert logged_retry(request_id), "the request was not run again after its replica was lost"
    assert np.array_equal(pixels(response.json()["data"][0]["b64_json"]),
                          pixels(undisturbed.json()["data"][0]["b64_json"]))


def stream(url: str, on_event=lambda event: None, **headers) -> list[dict]:
    events = []
    with httpx.stream("POST", url, json={**LONG, "stream": True, "partial_images": 3},
                      headers=headers, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                on_event(events[-1])
    return events


def test_a_stream_whose_replica_is_killed_after_a_preview_sends_each_preview_once_then_the_image(faults_url):
    url = f"{faults_url}/v1/images/generations"
    undisturbed = stream(url)
    kinds = ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e["type"] for e in undisturbed] == kinds
    (victim,) = model_replicas()
    request_id = f"killed-stream-{uuid.uuid4()}"

    def kill_after_the_first_preview(event):
        if event.get("partial_image_index") == 0:
            kill(victim)

    events = stream(url, kill_after_the_first_preview, **{"x-request-id": request_id})
    assert [e["type"] for e in events] == kinds, events[-1]
    assert [e["partial_image_index"] for e in events[:3]] == [0, 1, 2]
    assert logged_retry(request_id), "the stream was not run again after its replica was lost"
    # Previews 1 and 2 and the image come from the replica Serve started in the victim's place.
    for got, want in zip(events, undisturbed):
        assert np.array_equal(pixels(got["b64_json"]), pixels(want["b64_json"]))
