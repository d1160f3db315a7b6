"""What the benchmark scripts share: quiet libraries, the machine they ran on, the device's
name in their results' file names, percentiles, calls alternated against drift, writing a
report, and Ray Serve's floor app. Imports neither Ray nor the deployments at import time
(gpu.py runs where Ray is not installed); ``serve_floor_app`` imports Ray when called."""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable

GiB = 1024**3


def quiet() -> None:
    """No progress bars or load reports between the figures; warnings still show."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str, *packages: str) -> str:
    """The CPU, its cores, the GPU (with ``device == "cuda"``) and the versions of Python,
    torch, diffusers and ``packages``."""
    import importlib

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu_model()}, {cores} CPU cores"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        text = f"{props.name} ({props.total_memory / GiB:.1f} GiB), CUDA {torch.version.cuda}; {text}"
    versions = ", ".join(f"{name} {importlib.import_module(name).__version__}"
                         for name in ("torch", "diffusers", *packages))
    return f"{text}; Python {platform.python_version()}, {versions}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: str) -> str:
    """``cpu``, or the GPU's name as a file-name part (``nvidia-h100-80gb-hbm3``)."""
    if device != "cuda":
        return "cpu"
    import torch

    return slug(torch.cuda.get_device_name(0))


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values``, by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def alternate(calls: dict[str, Callable[[int], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each labelled call, the calls taken in turn one by one for ``rounds``
    rounds after ``warmup`` untimed ones, so that the machine's drift (tens of percent from
    minute to minute on a shared VM) falls on every label alike. Each call gets the round's
    index (a seed, where it takes one)."""
    times: dict[str, list[float]] = {label: [] for label in calls}
    for index in range(warmup + rounds):
        for label, call in calls.items():
            started = time.perf_counter()
            call(index)
            if index >= warmup:
                times[label].append(time.perf_counter() - started)
    return times


def write_lines(out: Path, name: str, lines: list[str]) -> Path:
    """Write a report's lines to ``out/name`` (the folder made if missing); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    report = out / name
    report.write_text("\n".join(lines) + "\n")
    return report


def serve_floor_app(make_model, route: str = "/v1/images/generations"):
    """Ray Serve's own floor for a served image, to measure this app's path against: a
    FastAPI route that calls one deployment, then encodes its image as the ingress does
    (fpng PNG, base64) into a JSON body built by hand. No validation, planning, batching,
    metrics or logging of ours: what is left is the proxy, FastAPI, two Serve hops, the
    array and the body.

    ``make_model()`` runs in the model replica and returns ``call(seed)`` -> one (H, W, 3)
    uint8 image; the call runs in a worker thread, as this app's pipelines do. Ray is
    imported here only (gpu.py uses this module where Ray is not installed)."""
    import asyncio
    import base64

    from fastapi import FastAPI
    from fastapi.responses import Response
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="FloorModel", ray_actor_options={"num_cpus": 0.01})
    class FloorModel:
        def __init__(self):
            self.call = make_model()

        async def run(self, seed: int):
            return await asyncio.to_thread(self.call, seed)

    @serve.deployment(name="FloorIngress", ray_actor_options={"num_cpus": 0.01})
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, model):
            self.model = model

        @api.post(route)
        async def generate(self, request: dict):
            from serve_app.service.encoding import encode_image

            seed = int(request.get("seed", 0))
            image = await self.model.run.remote(seed)
            png = await asyncio.to_thread(encode_image, image, "png")
            body = b'{"data":[{"b64_json":"' + base64.b64encode(png) + b'","seed":%d}]}' % seed
            return Response(content=body, media_type="application/json")

    return FloorIngress.bind(FloorModel.bind())
