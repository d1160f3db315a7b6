"""``build_app``: the ``import_path`` target of every Serve config in ``configs/``.

It validates the config's ``args`` and binds one deployment per model plus the ingress,
with Ray options taken from the config, never from code.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.families import SAFETY_CHECKER, family
from serve_app.config import INGRESS_NAME, SAFETY_NAME, STORE_NAME, AppConfig, load_app_config
from serve_app.ingress import ImagesIngress


def deployment_class(name: str):
    """The deployment class of a family, from the registry; imported only when a config
    uses it (they pull in torch and diffusers; the ingress never needs them)."""
    return family(name).deployment_class()


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """Build the application graph: ingress -> {model name: model deployment}."""
    config = load_app_config(args)
    handles = {
        model.name: serve.deployment(deployment_class(model.family))
        .options(name=model.name, **model.deployment.serve_options())
        .bind(model.pipeline_spec())
        for model in config.models
    }
    if config.safety is not None:
        handles[SAFETY_NAME] = (
            serve.deployment(deployment_class(SAFETY_CHECKER))
            .options(name=SAFETY_NAME, **config.safety.deployment.serve_options())
            .bind(config.safety.pipeline_spec())
        )
    from deployments.image_store import ImageStoreDeployment

    store = (
        serve.deployment(ImageStoreDeployment)
        .options(name=STORE_NAME, **config.image_store.deployment.serve_options())
        .bind(config.image_store.spec())
    )
    return (
        serve.deployment(ImagesIngress)
        .options(name=INGRESS_NAME, **config.ingress.deployment.serve_options())
        .bind(config, handles, store)
    )
