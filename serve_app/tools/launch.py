"""Start a Serve config file in this process: for tests, benchmarks and notebooks.

``serve run configs/tiny.yaml`` is the way to run the server; this does the same from
Python, on a port of the caller's choice, and tears everything down afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read a Serve config file (``configs/*.yaml``)."""
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base_url: str, timeout_s: float = 180.0) -> None:
    """Poll ``GET /health`` until it answers 200."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/health", timeout=5)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/health not ready after {timeout_s}s: {last}")


@contextlib.contextmanager
def run_local(
    config_path: str | Path,
    port: int | None = None,
    num_cpus: int = 4,
    args_override: dict[str, Any] | None = None,
    metrics_export_port: int | None = None,
    grpc_port: int | None = None,
) -> Iterator[str]:
    """Run the first application of ``config_path`` on a private Ray instance.

    Yields the base URL (``http://127.0.0.1:PORT``). ``num_cpus`` is Ray's logical CPU
    count: replicas in the tiny profile reserve fractions of a CPU, so a 2-core machine
    hosts them all. The application's ``runtime_env.env_vars`` are applied to this
    process before Ray starts, so every replica inherits them, and its ``logging_config``
    is used. With ``metrics_export_port``, Ray serves Prometheus metrics on that port. The
    config's ``grpc_options`` start Serve's gRPC proxy, on ``grpc_port`` when given, and its
    ``controller_options`` (the proxy's message limit) are Serve's, as ``serve run`` takes them.
    """
    import ray
    from ray import serve

    from serve_app.app import build_app

    serve_config = load_serve_config(config_path)
    app_config = serve_config["applications"][0]
    for key, value in app_config.get("runtime_env", {}).get("env_vars", {}).items():
        os.environ.setdefault(key, str(value))
    args = dict(app_config.get("args", {}))
    if args_override:
        args.update(args_override)
    port = port or free_port()
    # "local" always starts a private instance, never joins a cluster found on the machine.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_export_port,
        # Push metrics every second rather than every ten, so a scrape sees them soon.
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        grpc_options = dict(serve_config.get("grpc_options") or {})
        if grpc_options and grpc_port is not None:
            grpc_options["port"] = grpc_port
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    grpc_options=grpc_options or None,
                    controller_options=serve_config.get("controller_options"))
        serve.run(
            build_app(args),
            name=app_config.get("name", "default"),
            route_prefix=app_config.get("route_prefix", "/"),
            logging_config=app_config.get("logging_config"),
            blocking=False,
        )
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url)
        yield base_url
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
