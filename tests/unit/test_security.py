from typing import Annotated

import pytest
from fastapi import FastAPI, Form
from fastapi.testclient import TestClient

from serve_app.fronts.http import install_error_handlers
from serve_app.fronts.openai import ImageEditForm, ImageGenerationRequest
from serve_app.fronts.gate import GateMiddleware, GateSettings, api_keys_from, key_is_valid


def make_client(settings: GateSettings) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(GateMiddleware)
    app.state.gate = settings

    @app.post("/v1/images/generations")
    async def generations(body: ImageGenerationRequest):
        return {"ok": body.prompt}

    @app.post("/v1/images/edits")
    async def edits(form: Annotated[ImageEditForm, Form()]):
        return {"ok": len(await form.image.read())}

    @app.post("/upscale")
    async def livepeer():
        return {"ok": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return TestClient(app)


KEYS = GateSettings(api_keys=(b"sk-one", b"sk-two"))


def test_without_keys_everything_is_open():
    client = make_client(GateSettings())
    assert client.post("/v1/images/generations", json={"prompt": "a"}).status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer sk-wrong", "Basic sk-one", "sk-one", "Bearer "])
def test_keys_are_required_on_api_routes(header):
    client = make_client(KEYS)
    headers = {"Authorization": header} if header is not None else {}
    response = client.post("/v1/images/generations", json={"prompt": "a"}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert "sk-one" not in response.text
    # Livepeer's routes answer in its runner's shape: {"detail": {"msg": ...}}.
    response = client.post("/upscale", json={"prompt": "a"}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in response.json()["detail"]["msg"]
    assert "sk-one" not in response.text


@pytest.mark.parametrize("key", ["sk-one", "sk-two"])
def test_any_configured_key_opens(key):
    client = make_client(KEYS)
    response = client.post("/v1/images/generations", json={"prompt": "a"},
                           headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200


def test_health_stays_open():
    assert make_client(KEYS).get("/health").status_code == 200


def test_open_paths_are_matched_below_the_route_prefix():
    from serve_app.fronts.gate import route_path

    assert route_path({"path": "/secure/health", "root_path": "/secure"}) == "/health"
    assert route_path({"path": "/health", "root_path": ""}) == "/health"
    assert route_path({"path": "/v1/models", "root_path": "/secure"}) == "/v1/models"


def test_keys_come_from_config_and_environment():
    keys = api_keys_from(["sk-config"], {"SERVE_APP_API_KEYS": " sk-a, sk-b ,,sk-config"})
    assert keys == (b"sk-config", b"sk-a", b"sk-b")
    assert api_keys_from([], {}) == ()
    assert "sk-a" not in repr(GateSettings(api_keys=keys))


def test_key_check_compares_every_key():
    assert key_is_valid(b"b", (b"a", b"b"))
    assert not key_is_valid(b"c", (b"a", b"b"))
    assert not key_is_valid(b"", ())


def test_declared_oversized_body_is_413_before_reading():
    client = make_client(GateSettings(max_body_bytes=1000))
    response = client.post("/v1/images/generations", content=b"x" * 2000,
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_streamed_oversized_body_is_413():
    client = make_client(GateSettings(max_body_bytes=1000))

    def chunks():  # no content-length: chunked transfer
        for _ in range(10):
            yield b'{"prompt": "' + b"a" * 200

    response = client.post("/v1/images/generations", content=chunks(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_oversized_multipart_upload_is_413():
    client = make_client(GateSettings(max_body_bytes=5000))
    response = client.post("/v1/images/edits", data={"prompt": "a"},
                           files={"image": ("big.png", b"\0" * 20000, "image/png")})
    assert response.status_code == 413


def test_bodies_under_the_limit_pass():
    client = make_client(GateSettings(max_body_bytes=5000))
    response = client.post("/v1/images/edits", data={"prompt": "a"},
                           files={"image": ("small.png", b"\0" * 100, "image/png")})
    assert response.status_code == 200 and response.json() == {"ok": 100}


def test_livepeer_routes_answer_413_in_livepeers_shape():
    client = make_client(GateSettings(max_body_bytes=1000))
    response = client.post("/upscale", content=b"x" * 2000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "1000" in response.json()["detail"]["msg"]
