"""The application config: the ``args`` of a Serve config file, validated with pydantic.

One source of truth for served model names, aliases, defaults, limits and the Ray options
of every deployment. Unknown keys anywhere are rejected so that a typo in a config file
fails at deploy time with the offending path in the message.

One module a section: ``app`` (the whole config and loading it), ``models`` (served models,
refiner chains, LoRA adapters, the safety checker), ``generation`` (a model's request
defaults and limits), ``replica`` (batching and what a weights deployment shares),
``options`` (Ray Serve's deployment options, checked by Serve's own schema), ``ingress``
(the ingress and the image store), ``jobs`` (the jobs API and its webhooks), ``gpu``,
``names`` (the app's own deployment names) and ``defaults`` (the defaults that are more
than one field's). Import from here: ``from serve_app.config import AppConfig``.
"""

from serve_app.config.app import AppConfig, ConfigError, load_app_config
from serve_app.config.base import SourceField
from serve_app.config.generation import GenerationDefaults, GenerationLimits
from serve_app.config.gpu import GpuConfig, parse_memory
from serve_app.config.ingress import ImageStoreConfig, IngressConfig, JobInputsConfig, StoreQuota
from serve_app.config.jobs import JobsConfig, WebhooksConfig
from serve_app.config.models import (
    FamilyName,
    FusedLoraConfig,
    LoraAdapterConfig,
    ModelConfig,
    RefinerChainConfig,
    SafetyConfig,
)
from serve_app.config.names import INGRESS_NAME, JOBS_NAME, RESERVED_NAMES, SAFETY_NAME, STORE_NAME
from serve_app.config.options import DeploymentOptions
from serve_app.config.replica import BatchingConfig

__all__ = [
    "AppConfig", "BatchingConfig", "ConfigError", "DeploymentOptions", "FamilyName",
    "FusedLoraConfig", "GenerationDefaults", "GenerationLimits", "GpuConfig",
    "ImageStoreConfig", "IngressConfig", "INGRESS_NAME", "JobInputsConfig", "JOBS_NAME",
    "JobsConfig", "LoraAdapterConfig", "ModelConfig", "RefinerChainConfig", "RESERVED_NAMES",
    "SAFETY_NAME", "SafetyConfig", "SourceField", "STORE_NAME", "StoreQuota", "WebhooksConfig",
    "load_app_config", "parse_memory",
]
