"""``build_app``: the ``import_path`` target of every Serve config in ``configs/``.

It validates the config's ``args`` and binds one deployment per model plus the ingress,
with Ray options taken from the config, never from code.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.config import AppConfig, load_app_config
from serve_app.ingress import ImagesIngress

INGRESS_NAME = "ImagesIngress"


def deployment_class(family: str):
    """The deployment class of a pipeline family (imported lazily: it pulls in torch)."""
    if family == "sd21":
        from deployments.stable_diffusion import StableDiffusionDeployment

        return StableDiffusionDeployment
    if family == "sdxl":
        from deployments.sdxl import SDXLBaseDeployment

        return SDXLBaseDeployment
    if family == "sdxl-refiner":
        from deployments.sdxl import SDXLRefinerDeployment

        return SDXLRefinerDeployment
    if family == "sd-x2-latent-upscaler":
        from deployments.latent_upscaler import LatentUpscalerDeployment

        return LatentUpscalerDeployment
    if family == "sd-x4-upscaler":
        from deployments.x4_upscaler import X4UpscalerDeployment

        return X4UpscalerDeployment
    if family == "esrgan":
        from deployments.esrgan import ESRGANDeployment

        return ESRGANDeployment
    raise ValueError(f"no deployment for family {family!r}")


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """Build the application graph: ingress -> {model name: model deployment}."""
    config = load_app_config(args)
    handles = {
        model.name: serve.deployment(deployment_class(model.family))
        .options(name=model.name, **model.deployment.serve_options())
        .bind(model.pipeline_spec())
        for model in config.models
    }
    return (
        serve.deployment(ImagesIngress)
        .options(name=INGRESS_NAME, **config.ingress.deployment.serve_options())
        .bind(config, handles)
    )
