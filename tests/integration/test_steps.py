"""Step-level batching served end to end: a step-mode SD 2.1 (tests/integration/steps.yaml)
behind the ingress answers concurrent requests of different steps and guidance with the
pixels each gets alone, sharing UNet calls (the replica's stats say so)."""

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from ray import serve

from tests.conftest import REPO_ROOT
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration
STEPS_CONFIG = REPO_ROOT / "tests" / "integration" / "steps.yaml"
BODIES = [{"prompt": "a red fox", "seed": 1, "num_inference_steps": 12, "guidance_scale": 7.5},
          {"prompt": "a lighthouse", "seed": 2, "num_inference_steps": 6, "guidance_scale": 3.0, "n": 2},
          {"prompt": "a harbour", "seed": 3, "num_inference_steps": 9, "guidance_scale": 1.0},
          {"prompt": "a fox", "seed": 4, "num_inference_steps": 4, "guidance_scale": 5.0}]


@pytest.fixture(scope="module")
def steps_url(base_url):
    with side_app(STEPS_CONFIG, base_url) as url:
        yield url


def pixels(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB")).astype(int)
            for item in response.json()["data"]]


def replica_stats() -> dict:
    handle = serve.get_deployment_handle("stable-diffusion-2-1", app_name="steps")
    return handle.stats.remote().result(timeout_s=30)


def test_concurrent_requests_share_steps_and_keep_their_pixels(steps_url):
    url = f"{steps_url}/v1/images/generations"
    body = {"size": "256x256", "response_format": "b64_json"}
    with httpx.Client(timeout=120) as client:
        alone = [pixels(client.post(url, json={**body, **extra})) for extra in BODIES]
    calls_before = replica_stats()["unet_calls"]

    async def together():
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = []
            for extra in BODIES:
                tasks.append(asyncio.ensure_future(client.post(url, json={**body, **extra})))
                await asyncio.sleep(0.05)  # each arrives while the others run
            return await asyncio.gather(*tasks)

    shared = [pixels(response) for response in asyncio.run(together())]
    for one, other in zip(alone, shared):
        assert len(one) == len(other)
        assert all(np.abs(a - b).max() <= 2 for a, b in zip(one, other))
    stats = replica_stats()
    calls = stats["unet_calls"] - calls_before
    assert 0 < calls < 12 + 6 + 9 + 4  # fewer UNet calls than the steps run alone
    assert max(stats["jobs"][-calls:]) >= 2
