"""``build_app``: the ``import_path`` target of every Serve config in ``configs/``.

It validates the config's ``args`` and binds one deployment per model plus the ingress,
with Ray options taken from the config, never from code.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.families import SAFETY_CHECKER, family
from deployments.host import ModelHost
from serve_app.config import INGRESS_NAME, JOBS_NAME, SAFETY_NAME, STORE_NAME, AppConfig, load_app_config
from serve_app.fronts.ingress import ImagesIngress


def _model_deployment(family_name: str, name: str, options: dict[str, Any], spec: Any):
    """One model deployment: a :class:`ModelHost` naming the family's class, so that the
    controller building the app imports neither torch nor diffusers (the replica does)."""
    return (serve.deployment(ModelHost).options(name=name, **options)
            .bind(family(family_name).deployment_path, spec))


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """Build the application graph: ingress -> {model name: model deployment}."""
    config = load_app_config(args)
    handles = {
        model.name: _model_deployment(model.family, model.name,
                                      model.deployment.serve_options(), model.pipeline_spec())
        for model in config.models
    }
    if config.safety is not None:
        handles[SAFETY_NAME] = _model_deployment(
            SAFETY_CHECKER, SAFETY_NAME, config.safety.deployment.serve_options(),
            config.safety.pipeline_spec())
    from deployments.store.image_store import ImageStoreDeployment

    store = (
        serve.deployment(ImageStoreDeployment)
        .options(name=STORE_NAME, **config.image_store.deployment.serve_options())
        .bind(config.image_store.spec(config.jobs))
    )
    if config.jobs is not None:
        from serve_app.jobs.autoscaling import consumer_options
        from serve_app.jobs.consumer import consumer_class

        consumer = (serve.deployment(consumer_class(config))
                    .options(name=JOBS_NAME, **consumer_options(config.jobs))
                    .bind(config, handles, store))
        handles = {**handles, JOBS_NAME: consumer}  # bound with the app; the ingress never calls it
    return (
        serve.deployment(ImagesIngress)
        .options(name=INGRESS_NAME, **config.ingress.serve_options())
        .bind(config, handles, store)
    )
