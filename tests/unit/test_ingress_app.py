"""The app factory and what the ingress puts on its app's state (serve_app/fronts/ingress.py):
routes find the images service, the gate's settings, the jobs client and Serve's status on
``app.state``, so a test builds an app, fills its state and calls the routes with no Serve."""

from fastapi.testclient import TestClient

from serve_app.config import load_app_config
from serve_app.fronts import ingress
from serve_app.fronts.gate import GateSettings
from serve_app.fronts.ingress import APP_STATE, build_api
from serve_app.service.images import ImagesService
from tests.unit.fakes import fake_handles

BODY = {"prompt": "a fox", "size": "256x256", "seed": 5, "num_inference_steps": 4}


def constructed(config, monkeypatch):
    """The ingress as its constructor builds it (the class as written, under serve.ingress),
    told that Serve listens on loopback only (asking Serve's controller would start Ray)."""
    monkeypatch.setattr(ingress, "serve_listens_on", lambda: [])
    instance = object.__new__(ingress.ImagesIngress.__bases__[0])
    instance.__init__(config, fake_handles(config))
    return instance


def test_the_constructor_fills_the_state_of_an_app_of_its_own(tiny_args, monkeypatch):
    from serve_app.jobs.client import Jobs

    config = load_app_config(tiny_args)
    one, two = constructed(config, monkeypatch), constructed(config, monkeypatch)
    app = one.__serve_build_asgi_app__()  # what Serve serves on this replica
    assert app is one.api and app is not two.__serve_build_asgi_app__()
    assert app.state.service is one.service and app.state.gate is one.gate
    assert app.state.statuses is one.statuses
    assert isinstance(app.state.jobs, Jobs)  # the tiny profile's jobs section
    assert build_api().state.jobs is None  # without one, the jobs API is off
    assert all(hasattr(app.state, name) for name in APP_STATE)
    assert app.state.gate.max_body_bytes == config.ingress.max_upload_bytes


def test_a_route_finds_the_service_on_its_apps_state(tiny_args):
    config = load_app_config(tiny_args)
    handles = fake_handles(config)
    app = build_api()
    app.state.service = ImagesService(config, handles)
    with TestClient(app) as client:
        answer = client.post("/v1/images/generations", json={**BODY, "response_format": "b64_json"})
    assert answer.status_code == 200, answer.text
    assert [item["seed"] for item in answer.json()["data"]] == [5]
    assert sum(len(handle.calls) for handle in handles.values()) >= 1


def test_each_app_serves_its_own_service_and_gate(tiny_args):
    """Two apps from the factory share nothing: one's keys do not guard the other."""
    config = load_app_config(tiny_args)
    guarded, open_app = build_api(), build_api()
    for app in (guarded, open_app):
        app.state.service = ImagesService(config, fake_handles(config))
    guarded.state.gate = GateSettings(api_keys=(b"sk-one",))
    with TestClient(guarded) as client:
        assert client.post("/v1/images/generations", json=BODY).status_code == 401
        keyed = client.post("/v1/images/generations", json=BODY,
                            headers={"Authorization": "Bearer sk-one"})
        assert keyed.status_code == 200, keyed.text
    with TestClient(open_app) as client:
        assert client.post("/v1/images/generations", json=BODY).status_code == 200


def test_a_route_on_an_app_without_a_service_is_a_server_fault():
    """An app whose state lacks the service is the server's fault: a 500 in the envelope,
    never a 400 and never a traceback."""
    with TestClient(build_api(), raise_server_exceptions=False) as client:
        answer = client.post("/v1/images/generations", json=BODY)
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["type"] == "server_error" and "Traceback" not in answer.text


def test_the_jobs_routes_answer_404_while_the_jobs_api_is_off(tiny_args):
    config = load_app_config(tiny_args)
    app = build_api()
    app.state.service = ImagesService(config, fake_handles(config))
    with TestClient(app) as client:
        answer = client.get("/v1/images/jobs/job-1")
    assert answer.status_code == 404
    assert "jobs API is off" in answer.json()["error"]["message"]
