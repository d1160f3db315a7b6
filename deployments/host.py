"""``ModelHost``: the class ``build_app`` binds for every model deployment.

The deployment classes (``deployments/runtime/replica.py`` and the families' modules) import torch,
diffusers and transformers, 5 to 30 CPU-seconds. ``build_app`` runs in Serve's controller,
which only needs to know which class each deployment runs, so it binds this small class
with the family's class named as ``"module:Class"``; the replica imports the real class in
its own process and hands every attribute to it. Serve finds ``run``, ``stream``,
``check_health`` and the rest by ``getattr`` on the instance, which ``__getattr__`` answers.
Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from deployments.families import load_attribute


class ModelHost:
    """Runs the deployment class named ``class_path`` with ``spec``, imported in the replica."""

    def __init__(self, class_path: str, spec: Any):
        self._class_path = class_path
        self._model = load_attribute(class_path)(spec)

    def __getattr__(self, name: str) -> Any:
        # Called only for names this class lacks; ``_model`` itself is missing while the
        # constructor has not finished (or failed), and must not recurse.
        if name == "_model":
            raise AttributeError(name)
        return getattr(self._model, name)

    def __repr__(self) -> str:
        return f"ModelHost({self._class_path})"
