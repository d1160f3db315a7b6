"""``build_app``: the ``import_path`` target of every Serve config in ``configs/``.

It validates the config's ``args`` and binds one deployment per model plus the ingress,
with Ray options taken from the config, never from code.
"""

from __future__ import annotations

import importlib
from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.config import INGRESS_NAME, SAFETY_NAME, STORE_NAME, AppConfig, load_app_config
from serve_app.ingress import ImagesIngress


# The deployment class of each pipeline family, imported only when a config uses it
# (they pull in torch and diffusers; the ingress never needs them).
DEPLOYMENT_CLASSES = {
    "sd21": "deployments.stable_diffusion:StableDiffusionDeployment",
    "sdxl": "deployments.sdxl:SDXLBaseDeployment",
    "sdxl-refiner": "deployments.sdxl:SDXLRefinerDeployment",
    "sd-x2-latent-upscaler": "deployments.latent_upscaler:LatentUpscalerDeployment",
    "sd-x4-upscaler": "deployments.x4_upscaler:X4UpscalerDeployment",
    "esrgan": "deployments.esrgan:ESRGANDeployment",
    "safety-checker": "deployments.safety:SafetyCheckerDeployment",
}


def deployment_class(family: str):
    """The deployment class of a pipeline family."""
    module, _, name = DEPLOYMENT_CLASSES[family].partition(":")
    return getattr(importlib.import_module(module), name)


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
            serve.deployment(deployment_class("safety-checker"))
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
