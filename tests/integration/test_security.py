"""API keys and input limits through the real proxy, on a small app of its own."""

import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration

CONFIG = REPO_ROOT / "tests" / "integration" / "secure.yaml"
KEY = "sk-test-two"
# The app's keys, in its ingress's environment (never in its config).
SECURE_ENV = {"SERVE_APP_API_KEYS": "sk-test-one,sk-test-two"}


@pytest.fixture(scope="module")
def secure_url(base_url):
    """Deploy tests/integration/secure.yaml beside the tiny app; remove it afterwards."""
    with side_app(CONFIG, base_url, env=SECURE_ENV) as url:
        yield url


def png(width, height, noise=False):
    pixels = (np.random.default_rng(0).random((height, width, 3)) * 255 if noise
              else np.zeros((height, width, 3))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def upscale(url, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    files = kw.pop("files", {"image": ("in.png", png(32, 32), "image/png")})
    return httpx.post(f"{url}/v1/images/upscale", headers=headers, files=files, data=kw, timeout=60)


def test_openai_client_with_a_key(secure_url, tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(png(32, 32))
    client = openai.OpenAI(base_url=f"{secure_url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["esrgan-x2"]
    wrong = openai.OpenAI(base_url=f"{secure_url}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_every_api_route_needs_the_key(secure_url, key):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/images/generations"),
                         ("POST", "/v1/images/upscale"), ("POST", "/upscale"), ("POST", "/text-to-image")):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.request(method, f"{secure_url}{path}", headers=headers, timeout=30)
        assert response.status_code == 401, path
        if path in ("/upscale", "/text-to-image"):  # Livepeer's routes: its runner's shape
            assert "API key" in response.json()["detail"]["msg"]
        else:
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_health_is_open_without_a_key_and_tells_it_the_status_alone(secure_url):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        anonymous = httpx.get(f"{secure_url}/health", headers=headers, timeout=30)
        assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    keyed = httpx.get(f"{secure_url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    body = keyed.json()
    assert keyed.status_code == 200 and body["status"] == "ok" and body["failures"] == {}
    assert {"ImagesIngress", "ImageStore", "esrgan-x2"} <= set(body["deployments"])


def test_each_servers_document_says_where_a_key_is_needed(secure_url, base_url):
    """The OpenAPI document is built from the server's own config: with keys, the bearer
    scheme and a 401 on every route behind the gate; without keys (the tiny app), no 401."""
    secure = httpx.get(f"{secure_url}/openapi.json", timeout=30).json()
    assert [scheme["scheme"] for scheme in secure["components"]["securitySchemes"].values()] == ["bearer"]
    for method, path in (("get", "/v1/models"), ("post", "/v1/images/generations"), ("post", "/upscale"),
                         ("post", "/v1/images/jobs")):
        assert "401" in secure["paths"][path][method]["responses"], path
    assert "401" not in secure["paths"]["/health"]["get"]["responses"]
    assert "401" not in secure["paths"]["/v1/images/files/{image_id}"]["get"]["responses"]
    keyless = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    assert "securitySchemes" not in keyless["components"]
    assert not [path for path, item in keyless["paths"].items()
                for operation in item.values() if "401" in operation["responses"]]


def test_the_playground_page_is_open_but_its_calls_need_the_key(secure_url):
    page = httpx.get(f"{secure_url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Authorization" in page.text  # the page sends the key it is given
    assert httpx.get(f"{secure_url}/v1/models", timeout=30).status_code == 401


def test_upload_over_the_byte_limit_is_413(secure_url):
    response = upscale(secure_url, files={"image": ("big.png", png(300, 300, noise=True), "image/png")})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert upscale(secure_url).status_code == 200  # the server is fine afterwards


def test_prompt_over_the_limit_is_400(secure_url):
    response = upscale(secure_url, prompt="x" * 51)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_total_output_pixels_over_the_limit_is_400(secure_url):
    # 4 x (2 x 200)^2 = 640,000 > 600,000
    response = upscale(secure_url, n="4", files={"image": ("in.png", png(200, 200), "image/png")})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "n" and "600000" in error["message"]


def test_without_keys_an_ingress_listening_beyond_loopback_refuses_to_start(base_url):
    """The session's gRPC proxy listens on every interface (as Serve's always does): the secure
    app without keys and without ingress.allow_anonymous does not start, and says why."""
    from ray import serve

    serve.delete("secure")  # a fresh deploy (an update would keep the keyed replica running)
    with side_app(CONFIG, base_url, healthy=False):
        deadline, ingress = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            app = serve.status().applications.get("secure")
            ingress = app.deployments.get("ImagesIngress") if app is not None else None
            if ingress is not None and "SERVE_APP_API_KEYS" in (ingress.message or ""):
                break
            time.sleep(2)
        assert ingress is not None and ingress.replica_states.get("RUNNING", 0) == 0
        message = ingress.message or ""
        assert "SERVE_APP_API_KEYS" in message and "allow_anonymous" in message, message
        assert "gRPC on [::]" in message
