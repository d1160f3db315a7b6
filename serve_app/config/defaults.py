"""The app's defaults that are more than one field's own, in one table.

A plain field's default sits on its ``Field``, beside its description (docs/configuration.md
lists every one). What is here: the defaults of a deployment's Ray Serve options (Serve's
own are sized for a generic replica, not for a model's), each section's defaults for its
``deployment`` when the section leaves it out, the image store's per-key shares and the
webhooks' ports. A section that writes its ``deployment`` takes ``DEPLOYMENT`` for the keys
it leaves out.
"""

from __future__ import annotations

from typing import Any

# Every deployment: one CPU, no GPU, no custom resource, room for a batch of 4, an
# unbounded queue (Serve's own defaults for the rest).
DEPLOYMENT: dict[str, Any] = {
    "num_gpus": 0,
    "num_cpus": 1,
    "resources": {},
    "max_ongoing_requests": 4,
    "max_queued_requests": -1,
}

# A section's `deployment` when the section leaves it out: the ingress and the safety
# checker take many light calls; the image store is one replica holding every image; the
# jobs consumer is one replica running 4 jobs at once.
SECTION_DEPLOYMENTS: dict[str, dict[str, Any]] = {
    "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 64},
    "safety": {"num_cpus": 0.5, "max_ongoing_requests": 32},
    "image_store": {"num_cpus": 0.1, "num_replicas": 1, "max_ongoing_requests": 256},
    "jobs": {"num_cpus": 0.1, "num_replicas": 1, "max_ongoing_requests": 4},
}

# One API key's share of each pool of the image store.
IMAGE_STORE_PER_KEY: dict[str, int] = {"max_bytes": 250_000_000, "max_entries": 25_000}
JOB_INPUTS_PER_KEY: dict[str, int] = {"max_bytes": 200_000_000, "max_entries": 1_000}

# The ports webhooks may be posted to (http and https).
WEBHOOK_PORTS: tuple[int, ...] = (80, 443)

# A stopping ingress replica's grace period, beyond the request timeout, when the config
# writes none: time for a request at its timeout to be answered (a 504) before Serve kills it.
INGRESS_GRACE_MARGIN_S: float = 10.0
