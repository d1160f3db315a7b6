"""Test-wide settings: nothing reaches the network, tiny models build into a private folder."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("SERVE_APP_TINY_CACHE", tempfile.mkdtemp(prefix="serve-app-tiny-"))

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_args() -> dict:
    """The ``args`` of the application in configs/tiny.yaml."""
    from serve_app.launch import load_serve_config

    return load_serve_config(TINY_CONFIG)["applications"][0]["args"]


def pytest_collection_modifyitems(config, items):
    """The multi-node tests (tests/cluster) first: they start a Ray cluster of several
    nodes, which this process must join before the integration tests start their own."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("cluster") else 1)
