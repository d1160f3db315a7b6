"""The README documents every route, request field and config key the code has."""

import re

import pytest

from serve_app import config as config_module
from serve_app.protocol import ImageEditForm, ImageGenerationRequest, ImageVariationForm, UpscaleForm
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()

CONFIG_MODELS = [
    config_module.AppConfig,
    config_module.ModelConfig,
    config_module.RefinerChainConfig,
    config_module.DeploymentOptions,
    config_module.GenerationDefaults,
    config_module.GenerationLimits,
    config_module.IngressConfig,
    config_module.BatchingConfig,
    config_module.ImageStoreConfig,
    config_module.SafetyConfig,
]


@pytest.mark.parametrize("model", CONFIG_MODELS, ids=lambda m: m.__name__)
def test_every_config_key_is_documented(model):
    missing = [name for name in model.model_fields if not re.search(rf"\b{name}\b", README)]
    assert not missing, f"README lacks config keys of {model.__name__}: {missing}"


@pytest.mark.parametrize("model", [ImageGenerationRequest, ImageEditForm, ImageVariationForm, UpscaleForm])
def test_every_request_field_is_documented(model):
    for name in model.model_fields:
        assert f"`{name}`" in README, f"{model.__name__}.{name}"


def test_every_livepeer_field_is_documented():
    from serve_app.livepeer import LivepeerImageToImageForm, LivepeerTextToImageRequest, LivepeerUpscaleForm

    for model in (LivepeerTextToImageRequest, LivepeerImageToImageForm, LivepeerUpscaleForm):
        for name in model.model_fields:
            assert f"`{name}`" in README, f"{model.__name__}.{name}"


def test_every_route_is_documented():
    from serve_app.ingress import api

    documented = 0
    for path, methods in api.openapi()["paths"].items():
        shown = path.replace("{model_id}", "{model}")  # README names it by what it holds
        for method in methods:
            assert f"`{method.upper()} {shown}`" in README, f"{method.upper()} {path}"
            documented += 1
    assert documented >= 4
    assert "`GET /`" in README  # the playground (HTML, not in the OpenAPI document)
