"""One real Serve app from configs/tiny.yaml for the whole test session."""

import contextlib

import httpx
import pytest

from serve_app.tools.launch import free_port, load_serve_config, run_local, wait_healthy
from tests.conftest import TINY_CONFIG


def with_ingress_env(application, env: dict[str, str]):
    """``application`` (build_app's) with ``env`` in its ingress replica's environment: a side
    app's API keys (SERVE_APP_API_KEYS), which the session's other apps do not share."""
    bound = application._bound_deployment
    actor = {**(bound.ray_actor_options or {}), "runtime_env": {"env_vars": env}}
    return bound.options(ray_actor_options=actor).bind(*bound.init_args, **bound.init_kwargs)


def deploy_side_app(config_path, base_url, healthy=True, env=None, **args_override) -> str:
    """Deploy (or redeploy) the first application of ``config_path`` beside the tiny app, on
    the same Serve instance; ``args_override`` replaces top-level keys of its ``args``, ``env``
    (API keys) is set in its ingress replica's environment.
    Returns its base URL once ``/health`` answers 200 (``healthy=False``: once the deploy
    is sent, for an app that never gets there)."""
    from ray import serve

    from serve_app.app import build_app

    app = load_serve_config(config_path)["applications"][0]
    application = build_app({**app["args"], **args_override})
    if env:
        application = with_ingress_env(application, env)
    target = serve.api.RunTarget(target=application, name=app["name"], route_prefix=app["route_prefix"])
    # serve.run waits for the app to be RUNNING and raises once it is DEPLOY_FAILED.
    serve.run_many([target], wait_for_applications_running=healthy)
    url = f"{base_url}{app['route_prefix']}"
    if healthy:
        wait_healthy(url, timeout_s=120)
    return url


@contextlib.contextmanager
def side_app(config_path, base_url, healthy=True, env=None, **args_override):
    """deploy_side_app until the block ends; yields the app's base URL."""
    from ray import serve

    name = load_serve_config(config_path)["applications"][0]["name"]
    try:
        yield deploy_side_app(config_path, base_url, healthy, env, **args_override)
    finally:
        serve.delete(name)


@pytest.fixture(scope="session")
def metrics_port():
    """Where Ray serves this session's Prometheus metrics."""
    return free_port()


@pytest.fixture(scope="session")
def grpc_port():
    """Where Serve's gRPC proxy answers Stability's API this session (9000 in the config)."""
    return free_port()


@pytest.fixture(scope="session")
def jobs_folder(tmp_path_factory):
    """The session's own folder for the jobs' filesystem broker and state."""
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="session")
def base_url(metrics_port, grpc_port, jobs_folder):
    jobs = {**load_serve_config(TINY_CONFIG)["applications"][0]["args"]["jobs"],
            "data_folder": str(jobs_folder)}
    with run_local(TINY_CONFIG, metrics_export_port=metrics_port, grpc_port=grpc_port,
                   args_override={"jobs": jobs}) as url:
        yield url


@pytest.fixture(scope="session")
def grpc_target(base_url, grpc_port):
    """``host:port`` of the session's gRPC proxy, once the app is up."""
    return f"localhost:{grpc_port}"


@pytest.fixture(scope="session")
def client(base_url):
    """The real OpenAI client, pointed at our server (retries off: we assert on errors)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as session:
        yield session
