"""response_format "url": images kept in the bounded store, served by any ingress replica;
each API key's share of the store, and a store full of other keys' images."""

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from ray import serve

from serve_app.tools.launch import load_serve_config
from tests.conftest import REPO_ROOT
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration


CONFIG = REPO_ROOT / "tests" / "integration" / "urls.yaml"
TTL_S = 25  # as in urls.yaml: long enough for a store replica to restart


@pytest.fixture(scope="module")
def urls_url(base_url, tmp_path_factory):
    """The urls app, its store in a directory (an fsspec backend) so that it outlives the
    store replica."""
    args = load_serve_config(CONFIG)["applications"][0]["args"]
    assert args["image_store"]["ttl_s"] == TTL_S
    store = {**args["image_store"], "backend": f"file://{tmp_path_factory.mktemp('image-store')}"}
    keys = {"SERVE_APP_API_KEYS": "sk-urls-a,sk-urls-b,sk-urls-c,sk-urls-d"}
    with side_app(CONFIG, base_url, env=keys, image_store=store) as url:
        yield url


def png(width=32, height=24):
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def upscale(urls_url, key="sk-urls-a", n=1, image=None):
    """An ESRGAN upscale answered by URL, with an API key of urls.yaml."""
    return httpx.post(f"{urls_url}/v1/images/upscale", data={"response_format": "url", "n": str(n)},
                      headers={"Authorization": f"Bearer {key}"},
                      files={"image": ("in.png", image or png(), "image/png")}, timeout=60)


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
        response = upscale(urls_url)
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
    for not_an_id in ("x", "A" * 44, "..%2F..%2Fetc%2Fpasswd", "A" * 42 + "."):  # 404 before the store
        answer = httpx.get(f"{urls_url}/v1/images/files/{not_an_id}", timeout=30)
        assert answer.status_code == 404, not_an_id
    response = upscale(urls_url)
    url = response.json()["data"][0]["url"]
    assert httpx.get(url, timeout=30).status_code == 200
    time.sleep(TTL_S + 1)
    assert httpx.get(url, timeout=30).status_code == 404


def store_replicas() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::urls#ImageStore")]


def test_images_outlive_a_restarted_store_replica(urls_url):
    import ray

    response = upscale(urls_url)
    url = response.json()["data"][0]["url"]
    before = httpx.get(url, timeout=30)
    assert before.status_code == 200
    (victim,) = store_replicas()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    # Serve starts a new store replica, which reads the index back from the directory.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and store_replicas() in ([], [victim]):
        time.sleep(0.5)
    after = None
    while time.monotonic() < deadline:
        after = httpx.get(url, timeout=30)
        if after.status_code == 200:
            break
        time.sleep(0.5)
    assert store_replicas() != [victim]
    assert after is not None and after.status_code == 200, after and after.text
    assert after.content == before.content


def test_a_key_loses_its_own_oldest_images_never_another_keys(urls_url):
    """Each key's share is 4 images and the store's 9 (urls.yaml); the tests above leave at
    most one image of key a. An upscale of an 8x8 image with n=4 costs 4 entries, whatever
    their bytes."""
    tiny = upscale(urls_url, "sk-urls-b", n=4, image=png(8, 8))
    assert tiny.status_code == 200, tiny.text
    b_urls = [item["url"] for item in tiny.json()["data"]]
    more = upscale(urls_url, "sk-urls-b")  # past b's share: b's own oldest image goes
    b_urls.append(more.json()["data"][0]["url"])
    assert [httpx.get(url, timeout=30).status_code for url in b_urls] == [404, 200, 200, 200, 200]
    c_urls = [item["url"] for item in upscale(urls_url, "sk-urls-c", n=4).json()["data"]]
    # The store holds 8 or 9 images, none of them d's: d's two would evict others' images.
    refused = upscale(urls_url, "sk-urls-d", n=2)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "store_full")
    assert "image store" in error["message"] and "fault of the server" in error["message"]
    assert refused.headers["Retry-After"]
    assert all(httpx.get(url, timeout=30).status_code == 200 for url in [*b_urls[1:], *c_urls])
