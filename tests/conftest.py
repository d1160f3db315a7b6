"""Test-wide settings: nothing reaches the network, tiny models build into a private folder."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("SERVE_APP_TINY_CACHE", tempfile.mkdtemp(prefix="serve-app-tiny-"))

# The stand-ins' source kinds (tiny:, sim:) plug in through the package's entry points; a
# checkout that is not installed (a bare GPU machine) has them by importing them.
import deployments.standins.sim  # noqa: E402,F401
import deployments.standins.tiny  # noqa: E402,F401

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_args() -> dict:
    """The ``args`` of the application in configs/tiny.yaml."""
    from serve_app.tools.launch import load_serve_config

    return load_serve_config(TINY_CONFIG)["applications"][0]["args"]


def run_benchmark_smoke(name: str, out: Path, timeout: float):
    """Run ``python -m benchmarks.<name> --smoke --out <out>`` from the repository root as the
    benchmark is run: a process of its own (it sets torch's thread count, or starts its own
    Ray), inheriting this session's private tiny-model cache. Returns the finished process
    (output captured as text)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def benchmark_module(name: str):
    """``benchmarks.<name>``, imported when a fixture asks for it (several import torch,
    schemathesis or matplotlib at import time): ``return benchmark_module("bench")``."""
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


def ray_start_resources(params: dict) -> tuple[float, float, dict[str, float]]:
    """(CPUs, GPUs, custom resources) that a KubeRay group's ``rayStartParams`` declare; the
    custom ones are a JSON object inside a quoted string (passed to ``ray start --resources``)."""
    import json

    custom = params.get("resources")
    return (float(params.get("num-cpus", 0)), float(params.get("num-gpus", 0)),
            json.loads(json.loads(custom)) if custom else {})
