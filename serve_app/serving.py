"""The images service: plans a request, runs it on the model deployments, encodes the result.

Independent of HTTP and of Ray: it is handed a ``{deployment name: handle}`` map, so unit
tests can drive it with fake handles.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from serve_app.config import AppConfig
from serve_app.errors import ModelNotFoundError
from serve_app.imaging import encode_b64
from serve_app.planning import GenerationPlan, plan_generation, run_plan
from serve_app.protocol import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)


class ResultShapeError(RuntimeError):
    """A deployment returned a different number or size of images than planned."""


class ImagesService:
    def __init__(self, config: AppConfig, handles: dict[str, Any]):
        self.config = config
        self.handles = handles
        self.created = int(time.time())

    async def generate(self, req: ImageGenerationRequest) -> ImagesResponse:
        """Answer ``POST /v1/images/generations``."""
        plan = plan_generation(req, self.config)
        images = await run_plan(plan, self.handles)
        return await self._respond(plan, images)

    async def _respond(self, plan: GenerationPlan, images: np.ndarray) -> ImagesResponse:
        expected = (len(plan.seeds), plan.height, plan.width, 3)
        if getattr(images, "shape", None) != expected:
            # Never hand a client fewer or other images than it asked for.
            raise ResultShapeError(
                f"{plan.model} returned {getattr(images, 'shape', type(images))}, expected {expected}"
            )
        encoded = await asyncio.to_thread(
            encode_b64,
            images,
            plan.output_format,
            plan.output_compression,
            self.config.ingress.png_compress_level,
        )
        return ImagesResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=b64, seed=seed) for b64, seed in zip(encoded, plan.seeds)],
            output_format=plan.output_format,
            size=plan.size,
        )

    def _card(self, entry) -> ModelCard:
        return ModelCard(id=entry.name, created=self.created, owned_by=entry.owned_by)

    def list_models(self) -> ModelList:
        """Answer ``GET /v1/models``: every served name (aliases are accepted, not listed)."""
        return ModelList(data=[self._card(e) for e in [*self.config.models, *self.config.chains]])

    def get_model(self, model_id: str) -> ModelCard:
        entry = self.config.resolve(model_id)
        if entry is None:
            raise ModelNotFoundError(model_id, self.config.served_names())
        return self._card(entry)
