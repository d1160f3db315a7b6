"""Ray Serve's cold-start floors, for bench.py to launch with ``serve run`` beside
``configs/tiny.yaml`` (benchmarks only; not part of the product):

- ``hello``: one deployment answering "ok": Ray, its dashboard, Serve's controller and proxy
  starting, and nothing else;
- ``tiny_sd21``: one deployment that imports diffusers, loads the same tiny SD 2.1 pipeline
  from the same cache as the tiny profile and answers ``POST /`` with a 512x512 PNG: the least
  a served diffusers model costs to start here. No ingress, validation, safety checker or image
  store.

    serve run --app-dir benchmarks floor_apps:tiny_sd21
"""

from __future__ import annotations

import io
import os

from ray import serve
from starlette.requests import Request
from starlette.responses import Response


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Hello:
    def __call__(self, request: Request) -> Response:
        return Response(b"ok")


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class TinySD21:
    def __init__(self):
        import torch
        from diffusers import StableDiffusionPipeline

        from deployments.standins.tiny import materialize_tiny

        torch.set_num_threads(os.cpu_count() or 1)  # as the tiny profile's replica does

        self.pipe = StableDiffusionPipeline.from_pretrained(
            str(materialize_tiny("sd21")), safety_checker=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, request: Request) -> Response:
        image = self.pipe("a lighthouse at dusk", num_inference_steps=4, height=512, width=512).images[0]
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return Response(buffer.getvalue(), media_type="image/png")


hello = Hello.bind()
tiny_sd21 = TinySD21.bind()
