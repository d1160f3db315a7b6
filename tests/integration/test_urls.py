"""response_format "url": images kept in the bounded store, served by any ingress replica."""

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from ray import serve

from tests.conftest import REPO_ROOT
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def urls_url(base_url):
    with side_app(REPO_ROOT / "tests" / "integration" / "urls.yaml", base_url) as url:
        yield url


def png(width=32, height=24):
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_client_gets_a_url_that_serves_the_image(client):
    response = client.images.generate(prompt="a cat", size="256x256", n=2, response_format="url",
                                      extra_body={"seed": 4})
    for item in response.data:
        assert item.b64_json is None and item.url.startswith("http://127.0.0.1:")
        image = httpx.get(item.url, timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (256, 256)


def test_several_ingress_replicas_serve_every_stored_image(urls_url):
    status = serve.status().applications["urls"].deployments["ImagesIngress"]
    assert status.replica_states.get("RUNNING") == 2
    urls = []
    for _ in range(4):
        response = httpx.post(f"{urls_url}/v1/images/upscale", data={"response_format": "url"},
                              files={"image": ("in.png", png(), "image/png")}, timeout=60)
        assert response.status_code == 200, response.text
        (item,) = response.json()["data"]
        assert set(item) == {"url", "seed"} and item["url"].startswith(f"{urls_url}/v1/images/files/")
        urls.append(item["url"])
    # Many fetches spread over both ingress replicas; each finds every image.
    for _ in range(5):
        for url in urls:
            image = httpx.get(url, timeout=30)
            assert image.status_code == 200
            assert Image.open(io.BytesIO(image.content)).size == (64, 48)


def test_unknown_and_expired_ids_are_404(urls_url):
    missing = httpx.get(f"{urls_url}/v1/images/files/{'A' * 43}", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(f"{urls_url}/v1/images/upscale", data={"response_format": "url"},
                          files={"image": ("in.png", png(), "image/png")}, timeout=60)
    url = response.json()["data"][0]["url"]
    assert httpx.get(url, timeout=30).status_code == 200
    time.sleep(6)  # the app's time-to-live is 5 s
    assert httpx.get(url, timeout=30).status_code == 404
