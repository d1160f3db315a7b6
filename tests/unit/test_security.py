from typing import Annotated

import pytest
from fastapi import FastAPI, Form
from fastapi.testclient import TestClient

import serve_app.fronts.livepeer  # noqa: F401 - registers Livepeer's error shape, as the ingress does
from serve_app.fronts.error_handlers import install_error_handlers
from serve_app.fronts.openai import ImageEditForm, ImageGenerationRequest
from serve_app.fronts.gate import GateMiddleware, GateSettings, key_is_valid
from serve_app.protocol.keys import KeysError, exposure, load_api_keys


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


def test_keys_come_from_the_environment():
    keys = load_api_keys({"SERVE_APP_API_KEYS": " sk-a, sk-b ,,sk-a"})
    assert keys.keys == (b"sk-a", b"sk-b")
    assert load_api_keys({}).keys == () and not load_api_keys({})
    assert "sk-a" not in repr(GateSettings(api_keys=keys.keys)) and "sk-a" not in repr(keys)


def test_keys_come_from_a_file_too(tmp_path):
    """A mounted Secret: keys by commas or lines, comments skipped; both sources count."""
    path = tmp_path / "keys"
    path.write_text("# the service's keys\nsk-f1\nops:sk-f2, sk-f3\n\n")
    keys = load_api_keys({"SERVE_APP_API_KEYS_FILE": str(path), "SERVE_APP_API_KEYS": "sk-e"})
    assert set(keys.keys) == {b"sk-e", b"sk-f1", b"sk-f2", b"sk-f3"}
    assert dict(keys.names) == {"ops": b"sk-f2"}
    with pytest.raises(KeysError, match="SERVE_APP_API_KEYS_FILE"):
        load_api_keys({"SERVE_APP_API_KEYS_FILE": str(tmp_path / "missing")})


def test_named_keys_give_their_owners():
    from serve_app.protocol.keys import owner_of

    keys = load_api_keys({"SERVE_APP_API_KEYS": "ops:sk-ops,sk-plain,bot:sk-bot"})
    assert keys.keys == (b"sk-ops", b"sk-plain", b"sk-bot")
    assert keys.owners_named(["ops"]) == {owner_of(b"sk-ops")}
    with pytest.raises(KeysError, match="'nobody'") as info:
        keys.owners_named(["nobody"])
    assert "sk-" not in str(info.value)
    with pytest.raises(KeysError, match="two keys are named 'ops'"):
        load_api_keys({"SERVE_APP_API_KEYS": "ops:sk-1,ops:sk-2"})
    with pytest.raises(KeysError) as info:
        load_api_keys({"SERVE_APP_API_KEYS": "bad name:sk-secret"})
    assert "sk-secret" not in str(info.value)


def test_keys_in_the_config_are_a_config_error_naming_the_environment(tiny_args):
    from serve_app.config import ConfigError, load_app_config

    with pytest.raises(ConfigError) as info:
        load_app_config({**tiny_args, "ingress": {**tiny_args.get("ingress", {}), "api_keys": ["sk-x"]}})
    message = str(info.value)
    assert "ingress" in message and "api_keys" in message
    assert "SERVE_APP_API_KEYS" in message and "SERVE_APP_API_KEYS_FILE" in message
    assert "sk-x" not in message


def test_what_listens_beyond_loopback():
    assert exposure("127.0.0.1", False) == [] and exposure("localhost", False) == []
    assert exposure("::1", False) == []
    assert exposure("0.0.0.0", False) == ["HTTP on 0.0.0.0"]
    assert exposure("127.0.0.1", True) == ["gRPC on [::] (every interface)"]


def _ingress_check(tiny_args, environ, listening, **ingress):
    from serve_app.config import load_app_config
    from serve_app.fronts.ingress import check_keys

    args = {**tiny_args, "ingress": {**tiny_args.get("ingress", {}), **ingress}}
    return check_keys(load_app_config(args), load_api_keys(environ), listening)


def test_beyond_loopback_without_keys_the_ingress_refuses_to_start(tiny_args, monkeypatch):
    from serve_app.config import ConfigError
    from serve_app.fronts import ingress

    warnings = []
    monkeypatch.setattr(ingress.logger, "warning", lambda message, *args: warnings.append(message % args))

    with pytest.raises(ConfigError) as info:
        _ingress_check(tiny_args, {}, ["HTTP on 0.0.0.0"], allow_anonymous=False)
    message = str(info.value)
    assert "SERVE_APP_API_KEYS" in message and "ingress.allow_anonymous" in message
    assert "HTTP on 0.0.0.0" in message
    # Keys, loopback only, or the explicit setting (with a warning) let it start.
    _ingress_check(tiny_args, {"SERVE_APP_API_KEYS": "sk-a"}, ["HTTP on 0.0.0.0"], allow_anonymous=False)
    _ingress_check(tiny_args, {}, [], allow_anonymous=False)
    assert warnings == []
    _ingress_check(tiny_args, {}, ["gRPC on [::] (every interface)"], allow_anonymous=True)
    assert len(warnings) == 1 and "without API keys" in warnings[0] and "gRPC on [::]" in warnings[0]


def test_allow_anonymous_is_off_by_default_and_only_the_tiny_profile_sets_it():
    from serve_app.config import IngressConfig
    from serve_app.tools.launch import load_serve_config
    from tests.conftest import REPO_ROOT

    assert IngressConfig().allow_anonymous is False
    for name in ("local-gpu", "cluster"):
        args = load_serve_config(REPO_ROOT / "configs" / f"{name}.yaml")["applications"][0]["args"]
        assert "allow_anonymous" not in args.get("ingress", {}), name
        assert "api_keys" not in args.get("ingress", {}), name


def test_two_authorization_headers_are_a_400():
    for settings in (KEYS, GateSettings()):
        client = make_client(settings)
        response = client.post("/v1/images/generations", json={"prompt": "a"},
                               headers=[("Authorization", "Bearer sk-one"), ("Authorization", "Bearer sk-x")])
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", "Authorization")
        assert error["code"] == "duplicate_authorization" and "sk-" not in response.text


def test_the_gate_and_the_owner_read_the_same_header():
    """The owner of what a request leaves (jobs, URL images) is the key the gate checked."""
    from fastapi import Request

    from serve_app.fronts.shared import request_owner
    from serve_app.protocol.keys import owner_of

    client = make_client(KEYS)
    app = client.app

    @app.get("/v1/whoami")
    async def whoami(request: Request):
        return {"owner": request_owner(request)}

    response = client.get("/v1/whoami", headers={"Authorization": "Bearer sk-two"})
    assert response.json() == {"owner": owner_of(b"sk-two")}


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
