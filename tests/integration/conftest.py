"""One real Serve app from configs/tiny.yaml for the whole test session."""

import httpx
import pytest

from serve_app.launch import free_port, run_local
from tests.conftest import TINY_CONFIG


@pytest.fixture(scope="session")
def metrics_port():
    """Where Ray serves this session's Prometheus metrics."""
    return free_port()


@pytest.fixture(scope="session")
def base_url(metrics_port):
    with run_local(TINY_CONFIG, metrics_export_port=metrics_port) as url:
        yield url


@pytest.fixture(scope="session")
def client(base_url):
    """The real OpenAI client, pointed at our server (retries off: we assert on errors)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as session:
        yield session
