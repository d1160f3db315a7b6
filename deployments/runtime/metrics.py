"""Prometheus metrics of a model replica, exported through Ray's metrics agent.

Serve adds the deployment, replica and application tags itself.
"""

from __future__ import annotations

from ray.serve import metrics

_QUEUE_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


class ReplicaMetrics:
    """Denoising steps, queue wait, batch size and LoRA adapter loads and evictions of one
    model replica."""

    def __init__(self, model: str):
        self.tags = {"model": model}
        self.steps = metrics.Counter(
            "serve_app_denoising_steps", "Denoising steps run (one per batch step).", ("model",)
        )
        self.queue_wait = metrics.Histogram(
            "serve_app_queue_wait_seconds",
            "Time a job waited on its replica before its batch started.",
            _QUEUE_BOUNDARIES,
            ("model",),
        )
        self.batch_images = metrics.Histogram(
            "serve_app_batch_images", "Images per pipeline call.", _BATCH_BOUNDARIES, ("model",)
        )
        self.step_rows = metrics.Histogram(
            "serve_app_step_rows", "Step mode: UNet rows per call (the guided jobs count two "
            "rows an image).", [1, 2, 4, 8, 16, 32, 64, 128], ("model",)
        )
        self.lora_loads = metrics.Counter(
            "serve_app_lora_loads", "LoRA adapters loaded into a replica's pipeline.",
            ("model", "adapter"),
        )
        self.lora_evictions = metrics.Counter(
            "serve_app_lora_evictions",
            "LoRA adapters unloaded (least recently used) to make room for another.",
            ("model", "adapter"),
        )

    def on_batch(self, images: int, waits: list[float]) -> None:
        self.batch_images.observe(images, self.tags)
        for wait in waits:
            self.queue_wait.observe(wait, self.tags)

    def on_steps(self, steps: int) -> None:
        """Counted once a batch, not at each step: a metric call costs the denoising loop
        (on the pipeline thread, between GPU steps) a fraction of a millisecond."""
        if steps:
            self.steps.inc(steps, self.tags)

    def on_unet_call(self, rows: int, seconds: float) -> None:
        """Step mode: one UNet call of ``rows`` rows, every job in flight one step on."""
        self.steps.inc(1, self.tags)
        self.step_rows.observe(rows, self.tags)

    def on_lora_load(self, adapter: str) -> None:
        self.lora_loads.inc(1, {**self.tags, "adapter": adapter})

    def on_lora_eviction(self, adapter: str) -> None:
        self.lora_evictions.inc(1, {**self.tags, "adapter": adapter})
