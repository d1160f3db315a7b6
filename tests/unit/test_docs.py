"""The README and docs/ document every route, request field and config key the code has, name
nothing the code lacks, and link only to what exists.

README.md is the front door; the reference lives in docs/*.md (routes and fields in
docs/api.md, config keys in docs/configuration.md). These tests read them together.
"""

import importlib
import re
import typing

import pytest
import yaml
from pydantic import BaseModel

from serve_app import config as config_module
from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
DOC_FILES = [README, *sorted(DOCS.glob("*.md"))]
# Files whose relative links must resolve: the README, docs/ and k8s/README.md (a pointer).
LINKED_FILES = [*DOC_FILES, REPO_ROOT / "k8s" / "README.md"]
ALL_DOCS = "\n".join(path.read_text() for path in LINKED_FILES)
API = (DOCS / "api.md").read_text()
CONFIGURATION = (DOCS / "configuration.md").read_text()

README_MAX_LINES = 300

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
    config_module.StoreQuota,
    config_module.JobInputsConfig,
    config_module.SafetyConfig,
    config_module.LoraAdapterConfig,
    config_module.FusedLoraConfig,
    config_module.GpuConfig,
]

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
# A route written in backticks, as the docs name routes: `POST /v1/images/generations`.
ROUTE_RE = re.compile(rf"`({'|'.join(HTTP_METHODS)}) (/[^`\s]*)`")
# YAML blocks that are not app config, told apart by their top-level keys: Kubernetes
# manifests and Prometheus configs.
NOT_APP_CONFIG_KEYS = frozenset({"apiVersion", "kind", "metadata", "spec", "scrape_configs",
                                 "global", "rule_files"})
APP_IMPORT_PATH = "serve_app.app:build_api"


# Every request model of every route: (module, class), imported when a test runs.
WIRE_MODELS = [
    ("serve_app.fronts.openai", "ImageGenerationRequest"),
    ("serve_app.fronts.openai", "ImageEditForm"),
    ("serve_app.fronts.openai", "ImageVariationForm"),
    ("serve_app.fronts.openai", "UpscaleForm"),
    ("serve_app.fronts.livepeer", "LivepeerTextToImageRequest"),
    ("serve_app.fronts.livepeer", "LivepeerImageToImageForm"),
    ("serve_app.fronts.livepeer", "LivepeerUpscaleForm"),
]


def without_code_blocks(text: str) -> str:
    """``text`` with fenced code blocks (``` or ~~~, indented or not) blanked out."""
    lines, fence = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            lines.append("")
        elif fence is not None:
            if stripped.startswith(fence):
                fence = None
            lines.append("")
        else:
            lines.append(line)
    return "\n".join(lines)


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^[ \t]*```yaml\n(.*?)^[ \t]*```", text, re.S | re.M)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: links reduced to their text, lowercase,
    punctuation dropped except '-' and '_', each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", without_code_blocks(text), re.M):
        slug = github_slug(match.group(1))
        if slug in seen:
            seen[slug] += 1
            found.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            found.add(slug)
    return found


# --- what the code has, the docs must say -----------------------------------------------


def test_the_readme_is_a_front_door():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the reference goes in docs/"


@pytest.mark.parametrize("model", CONFIG_MODELS, ids=lambda m: m.__name__)
def test_every_config_key_is_documented(model):
    missing = [name for name in model.model_fields if f"`{name}`" not in CONFIGURATION]
    assert not missing, f"docs/configuration.md lacks config keys of {model.__name__}: {missing}"


@pytest.mark.parametrize("module, name", WIRE_MODELS, ids=[name for _, name in WIRE_MODELS])
def test_every_request_field_is_documented(module, name):
    model = getattr(importlib.import_module(module), name)
    missing = [name for name in model.model_fields if f"`{name}`" not in API]
    assert not missing, f"docs/api.md lacks request fields of {model.__name__}: {missing}"


def test_every_route_is_documented():
    from serve_app.fronts.ingress import build_api

    api = build_api()

    documented = 0
    for path, methods in api.openapi()["paths"].items():
        shown = path.replace("{model_id}", "{model}")  # the docs name it by what it holds
        for method in methods:
            assert f"`{method.upper()} {shown}`" in API, f"docs/api.md lacks {method.upper()} {path}"
            documented += 1
    assert documented >= 4
    assert "`GET /`" in API  # the playground (HTML, not in the OpenAPI document)


# --- what the docs say, the code must have ----------------------------------------------


def _route_shape(path: str) -> str:
    """A path with every parameter (and its converter) as ``{}``."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_every_route_the_docs_name_exists():
    from serve_app.fronts.ingress import build_api

    api = build_api()

    routes = {(method.upper(), _route_shape(path))
              for path, methods in api.openapi()["paths"].items() for method in methods}
    routes.add(("GET", "/"))  # the playground
    for url in (api.docs_url, api.openapi_url, api.redoc_url):
        if url:
            routes.add(("GET", url))
    named = {(method, path) for method, path in ROUTE_RE.findall(ALL_DOCS)}
    assert len(named) >= 10
    unknown = sorted(f"{method} {path}" for method, path in named
                     if (method, _route_shape(path)) not in routes)
    assert not unknown, f"the docs name routes the app does not have: {unknown}"


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field holds: itself, optional, or in a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _unknown_keys(node, model: type[BaseModel], path: str) -> list[str]:
    """Keys of ``node`` (parsed YAML) that ``model`` and the models it nests do not have."""
    from ray.serve.config import AutoscalingConfig

    if not isinstance(node, dict):
        return []
    unknown = []
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(where)
            continue
        if key == "autoscaling_config" and isinstance(value, dict):
            unknown += [f"{where}.{k}" for k in value if k not in AutoscalingConfig.model_fields]
            continue
        nested = _models_in(field.annotation)
        if not nested:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            unknown += _unknown_keys(item, nested[0], f"{where}.{i}" if isinstance(value, list) else where)
    return unknown


def app_configs_in_docs() -> list[tuple[str, dict]]:
    """(where, args) of every YAML block of the docs that is app config: a Serve config's
    applications that build this app, or the app's args (or a part of them) on their own."""
    found = []
    for doc in LINKED_FILES:
        for number, block in enumerate(yaml_blocks(doc.read_text())):
            where = f"{doc.relative_to(REPO_ROOT)} yaml block {number + 1}"
            data = yaml.safe_load(block)
            if not isinstance(data, dict) or set(data) & NOT_APP_CONFIG_KEYS:
                continue
            if "applications" in data:
                for app in data["applications"]:
                    if app.get("import_path") == APP_IMPORT_PATH:
                        found.append((where, app.get("args") or {}))
            else:
                found.append((where, data))
    return found


def test_every_config_key_in_the_docs_yaml_exists():
    configs = app_configs_in_docs()
    assert len(configs) >= 10
    for where, args in configs:
        unknown = _unknown_keys(args, config_module.AppConfig, "")
        assert not unknown, f"{where} names config keys the app config does not have: {unknown}"


def test_every_family_the_docs_name_exists():
    from deployments.families import FAMILIES

    named = set(re.findall(r"\bfamily: ([A-Za-z0-9_.-]+)", ALL_DOCS))
    assert named
    unknown = sorted(named - set(FAMILIES))
    assert not unknown, f"the docs name families deployments/families.py lacks: {unknown}"


def test_every_config_file_the_docs_name_exists():
    named = set(re.findall(r"\bconfigs/([A-Za-z0-9_.-]+\.yaml)\b", ALL_DOCS))
    assert {"tiny.yaml", "local-gpu.yaml", "cluster.yaml"} <= named
    missing = sorted(name for name in named if not (REPO_ROOT / "configs" / name).is_file())
    assert not missing, f"the docs name config files that do not exist: {missing}"


# --- links --------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", LINKED_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", without_code_blocks(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(REPO_ROOT)}")
    assert not broken, f"{doc.relative_to(REPO_ROOT)}: {broken}"


def test_github_slugs():
    assert github_slug("`POST /v1/images/generations`") == "post-v1imagesgenerations"
    assert github_slug("A request's way") == "a-requests-way"
    assert github_slug("First start, step by step") == "first-start-step-by-step"
    assert github_slug("The `serve-app` command") == "the-serve-app-command"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
