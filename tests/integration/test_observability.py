"""Request ids across replicas, structured logs, and Prometheus metrics."""

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration


def serve_log_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"


def log_lines_with(text: str, timeout_s: float = 20) -> dict[str, list[dict]]:
    """JSON log lines mentioning ``text``, by log file, waiting for them to be flushed."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, list[dict]] = {}
    while time.monotonic() < deadline:
        found = {}
        for path in serve_log_dir().glob("replica_*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if text in line:
                    found.setdefault(path.name, []).append(json.loads(line))
        if any("ImagesIngress" in name for name in found) and any("stable-diffusion-2-1" in name for name in found):
            break
        time.sleep(0.5)
    return found


def test_request_id_is_echoed_and_generated(http):
    request_id = f"obs-{uuid.uuid4()}"
    response = http.post("/v1/images/generations", json={"prompt": "a cat", "size": "256x256"},
                         headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    generated = http.post("/v1/images/generations", json={"prompt": "a cat", "size": "256x256"})
    assert len(generated.headers["x-request-id"]) >= 8
    error = http.post("/v1/images/generations", json={"prompt": "a cat", "n": 99},
                      headers={"x-request-id": request_id + "-bad"})
    assert error.status_code == 400 and error.headers["x-request-id"] == request_id + "-bad"


def test_request_id_is_in_the_logs_of_every_replica_it_touched(http):
    request_id = f"trace-{uuid.uuid4()}"
    response = http.post("/v1/images/generations", json={"prompt": "a cat", "size": "256x256"},
                         headers={"x-request-id": request_id})
    assert response.status_code == 200
    lines = log_lines_with(request_id)
    ingress = [line for name, ls in lines.items() if "ImagesIngress" in name for line in ls]
    model = [line for name, ls in lines.items() if "stable-diffusion-2-1" in name for line in ls]
    assert ingress and model, f"request id found only in {list(lines)}"
    # Structured: one JSON object per line, the id in its own field.
    assert all(line["request_id"] == request_id for line in ingress + model)
    assert any("model=stable-diffusion-2-1" in line.get("message", "") for line in ingress)


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name) and not line.startswith("#")]


def exported(port: int, wanted: dict[str, str], timeout_s: float = 60) -> tuple[dict[str, str], str]:
    """Scrape until every ``{metric: text one of its lines holds}`` is there, or the time is
    up: (what is still missing, the last scrape)."""
    deadline = time.monotonic() + timeout_s
    missing, text = dict(wanted), ""
    while missing and time.monotonic() < deadline:
        text = scrape(port)
        missing = {name: tag for name, tag in wanted.items()
                   if not any(tag in line for line in metric_lines(text, name))}
        time.sleep(1)
    return missing, text


def test_metrics_are_exported_for_prometheus(http, metrics_port):
    for _ in range(2):
        assert http.post("/v1/images/generations",
                         json={"prompt": "a cat", "size": "256x256", "n": 2}).status_code == 200
    assert http.post("/v1/images/generations", json={"prompt": "a cat", "n": 99}).status_code == 400
    wanted = {
        "ray_serve_app_requests_total": 'route="/v1/images/generations"',
        "ray_serve_app_images_total": 'model="stable-diffusion-2-1"',
        "ray_serve_app_denoising_steps_total": 'model="stable-diffusion-2-1"',
        "ray_serve_app_queue_wait_seconds_bucket": 'model="stable-diffusion-2-1"',
        "ray_serve_app_batch_images_bucket": 'model="stable-diffusion-2-1"',
    }
    missing, text = exported(metrics_port, wanted)
    assert not missing, f"not exported: {missing}"
    statuses = {line.split('status="')[1].split('"')[0]
                for line in metric_lines(text, "ray_serve_app_requests_total")
                if 'route="/v1/images/generations"' in line}
    assert {"200", "400"} <= statuses
