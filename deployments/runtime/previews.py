"""Cheap previews of a generation in progress, for streamed partial images.

By default a preview is a linear projection of the latents to RGB (no VAE decode): a 4x3
matrix and a bias per latent space, at the latent's resolution. A model configured with a
``preview_decoder`` decodes previews with that tiny autoencoder (TAESD) instead, at full
resolution. The ingress scales a preview to the output size.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from deployments.families import SD_LATENTS, SDXL_LATENTS

# Latent-to-RGB factors of the SD 1.x/2.x and SDXL latent spaces (as widely used for
# previews); rows are latent channels, columns R, G, B.
_FACTORS = {
    SD_LATENTS: (np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                     [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], np.float32),
           np.zeros(3, np.float32)),
    SDXL_LATENTS: (np.array([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                       [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]], np.float32),
             np.array([0.1084, -0.0175, -0.0011], np.float32)),
}


def latents_to_rgb(latents: np.ndarray, space: str) -> np.ndarray:
    """(N, 4, h, w) latents -> (N, h, w, 3) uint8 previews."""
    weights, bias = _FACTORS[space]
    rgb = np.einsum("nchw,cd->nhwd", latents.astype(np.float32), weights) + bias
    return ((np.clip(rgb, -1, 1) + 1) * 127.5).round().astype(np.uint8)


def preview_steps(total_steps: int, partial_images: int) -> list[int]:
    """The steps after which previews go out: evenly spaced, never the last step."""
    if partial_images <= 0 or total_steps <= 1:
        return []
    steps = {round((i + 1) * total_steps / (partial_images + 1)) - 1 for i in range(partial_images)}
    return sorted(s for s in steps if 0 <= s < total_steps - 1)


@dataclass
class PreviewSink:
    """Where a streamed job's previews go: a thread-safe hand-off to the event loop."""

    partial_images: int
    send: Callable[[int, np.ndarray], None]
    sent: int = 0


# Set by a streaming call for the job it submits (copied into the submitting task).
current_sink: contextvars.ContextVar[PreviewSink | None] = contextvars.ContextVar(
    "current_sink", default=None
)


def sink_for(queue: asyncio.Queue, partial_images: int) -> PreviewSink:
    loop = asyncio.get_running_loop()

    def send(index: int, pixels: np.ndarray) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("partial", index, pixels))

    return PreviewSink(partial_images, send)


def linear_previews(space: str) -> Callable[[Any], np.ndarray]:
    """Latent rows (a tensor) -> uint8 RGB previews by the linear projection of ``space``."""
    return lambda rows: latents_to_rgb(rows.float().cpu().numpy(), space)


def emit_previews(entries: list[Any], latents: Any, step: int, total_steps: int,
                  to_rgb: Callable[[Any], np.ndarray]) -> None:
    """From the step callback (worker thread): send each streamed job its due previews.

    ``to_rgb`` turns latent rows (N, 4, h, w) into uint8 images (N, H, W, 3).
    """
    offset = 0
    for entry in entries:
        sink = entry.preview
        if sink is not None and step in preview_steps(total_steps, sink.partial_images):
            rows = latents[offset : offset + entry.images][:1]  # the job's first image
            sink.send(sink.sent, to_rgb(rows)[0])
            sink.sent += 1
        offset += entry.images
