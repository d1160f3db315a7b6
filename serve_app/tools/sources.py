"""Weights sources of a config: which files each needs, whether they are there, fetching them.

Every source of an application (each model's ``source``, ``preview_decoder`` and ``vae``,
and ``safety.source``) is a :class:`deployments.sources.Source`, parsed when the config was
validated: a stand-in (a plug-in kind: built locally, nothing to download), a local folder
or file, a Hub repo id, or one file of a Hub repo (``hf://ID[@REVISION]/PATH``).

Which files a source needs is the libraries' choice, made on a listing (a local folder's
files, or the ``siblings`` of ``HfApi().model_info``):

- a pipeline (``model_index.json``): the files ``DiffusionPipeline.download`` takes, from
  diffusers' own helpers (:func:`pipeline_files`): safetensors unless a component has none,
  a variant's weights where a component has them, the configs, tokenizers and schedulers;
- one model folder (a VAE, a preview decoder, the safety checker): its configuration files
  (the registry's) and the weights diffusers' ``variant_compatible_siblings`` picks;
- one file (spandrel): that file (``HfApi().file_exists`` on the Hub).

``serve-app check`` and ``serve-app fetch`` use the one selection, so what is checked is
what is fetched: ``snapshot_download(allow_patterns=<the selection>)`` for a Hub repo,
``hf_hub_download`` for one Hub file (both with huggingface_hub's progress bars), a copy
for a local folder. What stays ours is what the libraries never say because they download
what exists: which files a component cannot load without (its class's configuration file,
a tokenizer's vocabulary, weights, every shard an index names).

Nothing here reaches the Hub unless asked to, nor imports torch for stand-in sources.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects

from deployments.families import FAMILIES, SAFETY_CHECKER, Family, component_for, family_of_source
from deployments.sources import HUB, HUB_FILE, LOCAL, Source, local_path

# How long one Hub call may take before the Hub counts as unreachable for the whole run.
DEFAULT_HUB_TIMEOUT_S = 10.0
# The files spandrel's ModelLoader.load_from_file reads (spandrel 0.4 has no list to import).
SINGLE_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
MODEL_INDEX = "model_index.json"


class HubUnreachable(Exception):
    """The Hub cannot be asked (offline mode, no answer, no network)."""


# ---------------------------------------------------------------------------------------
# The sources of a config
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRef:
    """One weights source of one application, and where it sits in the config."""

    app_index: int
    app_name: str
    # Path of the key inside the application's args, e.g. ("models", 0, "source").
    key: tuple[str | int, ...]
    label: str
    source: Source
    layout: str  # pipeline | model | single-file (the registry's layout)
    family: str | None = None
    revision: str | None = None
    variant: str | None = None
    # Pipeline components the loader hands to from_pretrained (a ``vae:`` override):
    # diffusers neither loads nor downloads them from the source.
    passed: tuple[str, ...] = ()

    @property
    def config_files(self) -> tuple[str, ...]:
        """Model layout: the configuration files the loader reads beside the weights."""
        return model_config_files(FAMILIES.get(self.family) if self.family else None)

    @property
    def hub_revision(self) -> str | None:
        """The revision asked of the Hub: an hf:// source's own, else the config's."""
        return self.source.revision or self.revision

    def describe(self) -> str:
        extras = [f"revision {self.revision}"] if self.revision else []
        extras += [f"variant {self.variant}"] if self.variant else []
        return str(self.source) + (f" [{', '.join(extras)}]" if extras else "")


def model_config_files(entry: Family | None) -> tuple[str, ...]:
    """Configuration files of a one-model folder: those the registry keeps for the real
    model (the safety checker has its image processor's beside its own), else config.json."""
    if entry is not None and entry.config_folder.is_dir():
        names = sorted(p.name for p in entry.config_folder.glob("*.json"))
        if names:
            return tuple(names)
    return ("config.json",)


def _component_family(model_family: Family, source: Source, capability: str) -> str | None:
    """The registry family a preview decoder or VAE source stands for: the one it names, or
    else the one of that capability in the model's latent space (a local folder)."""
    known = family_of_source(source) or component_for(capability, model_family.latent_space)
    return known.name if known is not None else None


def sources_of(app: Any, app_index: int = 0, app_name: str = "") -> list[SourceRef]:
    """Every weights source of a validated :class:`~serve_app.config.AppConfig`."""
    prefix = f"{app_name}: " if app_name else ""
    refs: list[SourceRef] = []
    for i, model in enumerate(app.models):
        entry = FAMILIES[model.family]
        where = f"{prefix}models[{i}] ({model.name})"
        # deployments/loading.py passes a `vae:` override to from_pretrained as `vae=`.
        passed = ("vae",) if model.vae is not None and entry.layout == "pipeline" else ()
        refs.append(SourceRef(app_index, app_name, ("models", i, "source"), f"{where}.source",
                              model.source, entry.layout, entry.name, model.revision,
                              model.variant, passed))
        # The loader takes neither revision nor variant for these components.
        for key, capability in (("preview_decoder", "preview-decoder"), ("vae", "vae")):
            value = getattr(model, key)
            if value is not None:
                refs.append(SourceRef(app_index, app_name, ("models", i, key), f"{where}.{key}",
                                      value, "model", _component_family(entry, value, capability)))
    if app.safety is not None:
        refs.append(SourceRef(app_index, app_name, ("safety", "source"), f"{prefix}safety.source",
                              app.safety.source, FAMILIES[SAFETY_CHECKER].layout, SAFETY_CHECKER,
                              app.safety.revision))
    return refs


def read_serve_config(config_path: str | Path) -> dict[str, Any]:
    """A Serve config file as written; :class:`~serve_app.config.ConfigError` when it cannot
    be read (no such file, not YAML) or holds no applications."""
    from serve_app.config import ConfigError
    from serve_app.tools.launch import load_serve_config

    try:
        serve_config = load_serve_config(config_path)
    except OSError as exc:
        raise ConfigError(f"cannot read {config_path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path} is not YAML: {exc}") from None
    applications = serve_config.get("applications") if isinstance(serve_config, dict) else None
    if not applications or not isinstance(applications, list):
        raise ConfigError(f"{config_path}: no 'applications' in this Serve config")
    for index, application in enumerate(applications):
        if not isinstance(application, dict):
            raise ConfigError(f"{config_path}: applications[{index}] is not a mapping")
    return serve_config


def apps_of(serve_config: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(application name, AppConfig)`` of every application of a Serve config (as read by
    :func:`read_serve_config`); :class:`~serve_app.config.ConfigError` names the invalid one."""
    from serve_app.config import ConfigError, load_app_config

    apps = []
    for index, application in enumerate(serve_config["applications"]):
        name = application.get("name", f"applications[{index}]")
        try:
            apps.append((name, load_app_config(application.get("args") or {})))
        except ConfigError as exc:
            raise ConfigError(f"application {name!r}: {exc}") from None
    return apps


def load_apps(config_path: str | Path) -> list[tuple[str, Any]]:
    """Read a Serve config file and validate every application's args.

    Returns ``(application name, AppConfig)`` pairs; raises
    :class:`~serve_app.config.ConfigError` on an unreadable or invalid config.
    """
    return apps_of(read_serve_config(config_path))


def config_sources(config_path: str | Path) -> list[SourceRef]:
    """Every weights source of every application of a Serve config file."""
    return [ref for index, (name, app) in enumerate(load_apps(config_path))
            for ref in sources_of(app, index, name)]


# ---------------------------------------------------------------------------------------
# Which files a loader needs
# ---------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The files of a source its loader needs, and what is missing."""

    files: list[str] = field(default_factory=list)  # relative paths, present
    missing: list[str] = field(default_factory=list)  # relative paths (or a description)
    problems: list[str] = field(default_factory=list)  # errors other than a missing file
    notes: list[str] = field(default_factory=list)  # worth saying, not an error
    pipeline_class: str | None = None

    @property
    def usable(self) -> bool:
        return not self.missing and not self.problems

    def _need(self, path: str, present: set[str]) -> bool:
        if path in present:
            if path not in self.files:
                self.files.append(path)
            return True
        self.missing.append(path)
        return False


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers warns of a variant found in some components only; the check says so in a note."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class PipelineFiles:
    """What ``DiffusionPipeline.download`` would take of a pipeline repo's listing."""

    files: tuple[str, ...]  # the files, sorted
    variant_files: frozenset[str]  # the weights (and indexes) of the asked variant
    model_folders: frozenset[str]  # components with weight files
    safetensors: bool  # every model component has safetensors (else .bin throughout)


def _ignore_patterns(files: list[str], model_folders: set[str], passed: Iterable[str],
                     variant: str | None) -> list[str]:
    # diffusers 0.42's private _get_ignore_patterns, as DiffusionPipeline.download calls it
    # (use_safetensors left to its default: safetensors when every component has them, else
    # the pickled .bin; never flax, ONNX on ONNX pipelines only, none here). Its public part,
    # is_safetensors_compatible, decides only the first half.
    from diffusers.pipelines.pipeline_loading_utils import _get_ignore_patterns

    return _get_ignore_patterns(list(passed), model_folders, files, use_safetensors=True,
                                allow_pickle=True, use_onnx=None, is_onnx=False,
                                use_flashpack=False, variant=variant)


def _take(files: Iterable[str], allow: list[str], ignore: list[str]) -> list[str]:
    # What DiffusionPipeline.download keeps, with huggingface_hub's own pattern filter
    # (snapshot_download's): index files of ignored weights go too.
    ignore = ignore + [f"{pattern}.index.*json" for pattern in ignore]
    return sorted(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))


def pipeline_files(files: Iterable[str], index: dict[str, Any], variant: str | None = None,
                   passed: Iterable[str] = ()) -> PipelineFiles:
    """The files of a pipeline listing that ``DiffusionPipeline.download`` takes (diffusers
    0.42, ``pipeline_utils.py``), from its own helpers: ``filter_model_files``,
    ``variant_compatible_siblings`` and ``_get_ignore_patterns``. ``download`` has no dry
    run and fetches into the Hub cache only, so the allow patterns it builds are built here
    the same way (custom pipeline code and connected pipelines aside: never loaded here).

    Raises ValueError (diffusers') when a ``variant`` is asked that no file has.
    """
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.pipeline_loading_utils import (
        CUSTOM_PIPELINE_FILE_NAME,
        filter_model_files,
        variant_compatible_siblings,
    )
    from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME
    from diffusers.utils import CONFIG_NAME
    from diffusers.utils.constants import TRANSFORMERS_COMPONENT_AUX_FILES

    passed = list(passed)
    names = sorted(set(files) - set(index.get("_ignore_files", [])))
    folder_names = [k for k, v in index.items() if isinstance(v, list) and k != "_class_name"]
    model_folders = {os.path.split(f)[0] for f in filter_model_files(names)
                     if os.path.split(f)[0] in folder_names}
    ignore = _ignore_patterns(names, model_folders, passed, variant)
    with _quiet_diffusers():
        model_files, variant_files = variant_compatible_siblings(names, variant=variant,
                                                                 ignore_patterns=ignore)
    allow = list(model_files)
    allow += [f"{k}/*" for k in folder_names if k not in model_folders]
    allow += [f"{k}/{CONFIG_NAME}" for k in model_folders]
    allow += [SCHEDULER_CONFIG_NAME, CONFIG_NAME, DiffusionPipeline.config_name,
              CUSTOM_PIPELINE_FILE_NAME]
    allow = [p for p in allow if not (len(p.split("/")) == 2 and p.split("/")[0] in passed)]
    allow += TRANSFORMERS_COMPONENT_AUX_FILES
    return PipelineFiles(tuple(_take(names, allow, ignore)), frozenset(variant_files),
                         frozenset(model_folders), "*.safetensors" not in ignore)


def model_files(files: Iterable[str], variant: str | None = None) -> list[str]:
    """The weight files (and shard indexes) at the root of one model's folder that its
    ``from_pretrained`` reads, chosen as diffusers chooses a component's: safetensors when
    there are any, else .bin; the variant's when asked and present."""
    from diffusers.pipelines.pipeline_loading_utils import variant_compatible_siblings

    root = sorted(f for f in files if "/" not in f)
    ignore = _ignore_patterns(root, set(), (), variant)
    with _quiet_diffusers():
        chosen, _ = variant_compatible_siblings(root, variant=variant, ignore_patterns=ignore)
    return _take(chosen, ["*"], ignore)


# What a component's class reads, as its library names the files.
_CONFIG, _WEIGHTS, _VOCABULARY = "config", "weights", "vocabulary"


def _class_needs(cls: type) -> dict[str, Any]:
    """The files a loadable class cannot load without: its configuration file, the name of
    its safetensors weights (models), its vocabulary files (tokenizers)."""
    import diffusers
    import transformers
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from transformers.tokenization_utils_base import FULL_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE
    from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, SAFE_WEIGHTS_NAME

    if issubclass(cls, diffusers.ModelMixin):
        return {_CONFIG: cls.config_name, _WEIGHTS: SAFETENSORS_WEIGHTS_NAME}
    if issubclass(cls, transformers.PreTrainedModel):
        return {_CONFIG: CONFIG_NAME, _WEIGHTS: SAFE_WEIGHTS_NAME}
    if issubclass(cls, diffusers.ConfigMixin):  # schedulers, guiders
        return {_CONFIG: cls.config_name}
    if issubclass(cls, transformers.PreTrainedTokenizerBase):
        # tokenizer.json alone, or the files of the tokenizer's own vocabulary.
        vocabulary = tuple(sorted(n for n in getattr(cls, "vocab_files_names", {}).values()
                                  if n != FULL_TOKENIZER_FILE))
        return {_CONFIG: TOKENIZER_CONFIG_FILE, _VOCABULARY: (FULL_TOKENIZER_FILE, vocabulary)}
    if issubclass(cls, (transformers.ImageProcessingMixin, transformers.FeatureExtractionMixin)):
        return {_CONFIG: IMAGE_PROCESSOR_NAME}
    return {}


def _is_index(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.endswith(".json") and ".index." in base


def _weights_in(folder: str, chosen: Iterable[str]) -> list[str]:
    """The weight files (diffusers' ``filter_model_files``) of one component folder."""
    from diffusers.pipelines.pipeline_loading_utils import filter_model_files

    return [f for f in filter_model_files(list(chosen)) if str(PurePosixPath(f).parent) == folder]


def _check_shards(chosen: Iterable[str], present: set[str], read_json, selection: Selection) -> None:
    # A sharded checkpoint loads only with every shard its index names; the loaders find
    # out while loading, the download takes what is there.
    for index in (f for f in chosen if _is_index(f)):
        if read_json is None:
            continue
        prefix = str(PurePosixPath(index).parent)
        prefix = "" if prefix == "." else f"{prefix}/"
        try:
            shards = set(read_json(index).get("weight_map", {}).values())
        except HubUnreachable:
            raise
        except Exception:  # an unreadable index is the loader's error to report
            continue
        selection.missing += sorted(prefix + s for s in shards if prefix + s not in present)


def _select_pipeline(present: set[str], read_json, variant: str | None, passed: tuple[str, ...],
                     selection: Selection) -> None:
    from diffusers.pipelines.pipeline_loading_utils import simple_get_class_obj

    if not selection._need(MODEL_INDEX, present):
        return
    try:
        index = read_json(MODEL_INDEX) if read_json else None
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except HubUnreachable:
        raise
    except Exception as exc:
        selection.problems.append(f"{MODEL_INDEX} unreadable: {exc}")
        return
    selection.pipeline_class = index.get("_class_name")
    try:
        chosen = pipeline_files(present, index, variant, passed)
    except ValueError:  # diffusers refuses a variant that no component has
        selection.problems.append(f"variant {variant!r} not found: no component has "
                                  f"*.{variant}.safetensors (or .bin) weights")
        return
    selection.files = list(chosen.files)
    for name, entry in index.items():
        # Components are [library, class]; [null, null] is a component left out, and the
        # other keys are pipeline settings (requires_safety_checker, ...).
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        if None in entry or name in passed:
            continue
        library, class_name = entry
        try:
            cls = simple_get_class_obj(library, class_name)
        except (ImportError, AttributeError, ValueError) as exc:
            selection.problems.append(f"{name}: {library}.{class_name} cannot be loaded here "
                                      f"({str(exc).splitlines()[0]})")
            continue
        needs = _class_needs(cls) if isinstance(cls, type) else {}
        if _CONFIG in needs:
            selection._need(f"{name}/{needs[_CONFIG]}", present)
        if _VOCABULARY in needs:
            whole, parts = needs[_VOCABULARY]
            if f"{name}/{whole}" not in present and not (
                    parts and all(f"{name}/{p}" in present for p in parts)):
                alternative = f" (or {' + '.join(parts)})" if parts else ""
                selection.missing.append(f"{name}/{whole}{alternative}")
        if _WEIGHTS in needs:
            weights = _weights_in(name, chosen.files)
            if not weights:
                selection.missing.append(f"{name}/{needs[_WEIGHTS]} (weights)")
            elif variant is not None and not chosen.variant_files.intersection(weights):
                selection.notes.append(f"{name}: no {variant} weights, the default ones load")
    if not chosen.safetensors and any(f.endswith(".bin") for f in chosen.files):
        selection.notes.append("a component has no safetensors weights: diffusers takes the "
                               ".bin weights of every component")
    _check_shards(chosen.files, present, read_json, selection)


def _select_model(present: set[str], read_json, variant: str | None,
                  config_files: Iterable[str], selection: Selection) -> None:
    for config in config_files:
        selection._need(config, present)
    try:
        chosen = model_files(present, variant)
    except ValueError:
        chosen = []
        selection.problems.append(f"variant {variant!r} not found")
    weights = [f for f in chosen if not _is_index(f)]
    if not weights and not selection.problems:
        selection.missing.append("diffusion_pytorch_model.safetensors or model.safetensors (weights)")
    selection.files += [f for f in chosen if f not in selection.files]
    _check_shards(chosen, present, read_json, selection)


def select_files(
    layout: str,
    files: Iterable[str],
    read_json: Callable[[str], Any] | None = None,
    *,
    variant: str | None = None,
    config_files: Iterable[str] = ("config.json",),
    filename: str | None = None,
    passed: Iterable[str] = (),
) -> Selection:
    """The files of a source (a folder's or a repo's listing) that its loader needs.

    ``layout`` is the registry's: ``pipeline`` (what ``DiffusionPipeline.download`` takes:
    :func:`pipeline_files`; each component's class says what it cannot load without),
    ``model`` (``config_files`` and the weights :func:`model_files` picks at the root) or
    ``single-file`` (``filename``). ``read_json(path)`` reads a file of the listing
    (``model_index.json``, shard indexes). ``passed`` names pipeline components the loader
    passes in (not loaded from the source).
    """
    present = set(files)
    selection = Selection()
    if layout == "single-file":
        if filename is None:
            raise ValueError("single-file layout needs a filename")
        selection._need(filename, present)
        return selection
    if layout == "model":
        _select_model(present, read_json, variant, config_files, selection)
        return selection
    if layout != "pipeline":
        raise ValueError(f"unknown layout {layout!r}")
    _select_pipeline(present, read_json, variant, tuple(passed), selection)
    return selection


def select_for(ref: SourceRef, files: Iterable[str], read_json: Callable[[str], Any] | None,
               filename: str | None = None) -> Selection:
    """:func:`select_files` with a source's layout, variant, configuration files and the
    components its loader passes in."""
    return select_files(ref.layout, files, read_json, variant=ref.variant,
                        config_files=ref.config_files, filename=filename, passed=ref.passed)


# ---------------------------------------------------------------------------------------
# Where a source is
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """What a (non-stand-in) source is for its loader: ``what`` it is as the check reports
    it, the local path (local sources) and why the loader cannot take it (``error``)."""

    what: str
    path: Path | None = None
    error: str | None = None


def locate(ref: SourceRef) -> Location:
    """A source as its loader takes it: spandrel reads one file (local, or hf://), the
    diffusers and transformers loaders a folder or a Hub repo id."""
    source = ref.source
    single_file = ref.layout == "single-file"
    if source.kind == HUB_FILE:
        if not single_file:
            return Location("Hub file", error="hf:// names one file; this loader takes a Hub "
                                              "repo id or a folder")
        return Location("Hub file")
    if source.kind == HUB:
        if single_file:
            return Location("Hub repo", error="this loader reads one file: "
                                              f"hf://{source.repo_id}/PATH or a local file")
        return Location("Hub repo")
    path = Path(local_path(source))
    if single_file:
        if path.is_dir():
            return Location("local file", path, "is a folder; expected a "
                            f"{' / '.join(SINGLE_FILE_SUFFIXES)} file")
        if not path.is_file():
            return Location("local file", path, "no such file")
        return Location("local file", path)
    what = f"local {ref.layout} folder"
    if path.is_dir():
        return Location(what, path)
    if path.exists():
        return Location(what, path, "is a file; expected a folder")
    return Location(what, path, "no such folder (and not a Hub repo id)")


def local_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative POSIX path, hidden folders (.cache of a
    Hub download, .git) left out."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(folder)
        found += [(rel / n).as_posix() for n in names]
    return sorted(found)


def _local_json_reader(folder: Path) -> Callable[[str], Any]:
    def read(path: str) -> Any:
        return json.loads((folder / path).read_text(encoding="utf-8"))

    return read


# ---------------------------------------------------------------------------------------
# The Hub
# ---------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(hub_constants.HF_HUB_OFFLINE)


def _with_timeout(call: Callable[[], Any], timeout_s: float) -> Any:
    # A daemon thread: a call that hangs must neither block us nor the interpreter's exit.
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise HubUnreachable(f"no answer within {timeout_s:g}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class Hub:
    """The Hub as this run sees it: listings cached, and once it has failed to answer it
    is not asked again (one timeout per run, not one per source). Downloads are not timed:
    they take as long as the weights do."""

    def __init__(self, timeout_s: float = DEFAULT_HUB_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.unreachable: str | None = "HF_HUB_OFFLINE is set" if hub_offline() else None
        self._listings: dict[tuple[str, str | None], list[str]] = {}

    def _call(self, call: Callable[[], Any]) -> Any:
        if self.unreachable:
            raise HubUnreachable(self.unreachable)
        try:
            return _with_timeout(call, self.timeout_s)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise  # the Hub answered
        except HubUnreachable as exc:
            self.unreachable = str(exc)
            raise
        except Exception as exc:  # no network, offline mode, a Hub error
            self.unreachable = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            raise HubUnreachable(self.unreachable) from exc

    def list_files(self, repo: str, revision: str | None) -> list[str]:
        """The files of a model repo: the siblings of ``HfApi().model_info``."""
        key = (repo, revision)
        if key not in self._listings:
            info = self._call(lambda: HfApi().model_info(repo, revision=revision,
                                                         files_metadata=False))
            self._listings[key] = [sibling.rfilename for sibling in info.siblings or []]
        return self._listings[key]

    def json_reader(self, repo: str, revision: str | None) -> Callable[[str], Any]:
        """Read a small JSON file of a repo (downloaded to the Hub cache)."""
        def read(path: str) -> Any:
            local = self._call(lambda: hf_hub_download(repo, path, revision=revision))
            return json.loads(Path(local).read_text(encoding="utf-8"))

        return read

    def file_problem(self, source: Source, revision: str | None) -> str | None:
        """Why one Hub file (an hf:// source) cannot be downloaded, or None: it exists."""
        repo, repo_type = source.repo_id, source.repo_type
        api = HfApi()
        if self._call(lambda: api.file_exists(repo, source.path_in_repo, repo_type=repo_type,
                                              revision=revision)):
            return None
        # file_exists says False for a missing repo or revision too: say which.
        if not self._call(lambda: api.repo_exists(repo, repo_type=repo_type)):
            return _no_repo(repo)
        if revision and not self._call(lambda: api.revision_exists(repo, revision,
                                                                   repo_type=repo_type)):
            return _no_revision(repo, revision)
        return f"missing {source.path_in_repo}"


def _no_repo(repo: str) -> str:
    return f"repo {repo} does not exist (or is private: log in with HF_TOKEN)"


def _no_revision(repo: str, revision: str | None) -> str:
    return f"revision {revision!r} does not exist in {repo}"


def _hub_answer_error(exc: Exception, repo: str, revision: str | None) -> str:
    if isinstance(exc, GatedRepoError):
        return f"repo {repo} is gated: accept its terms on the Hub and log in (HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return _no_revision(repo, revision)
    return _no_repo(repo)


# ---------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------

OK, NOT_CHECKED, PROBLEM = "OK", "NOT CHECKED", "PROBLEM"
STAND_IN = "stand-in source"


@dataclass
class SourceReport:
    """What one source is and whether it is usable."""

    ref: SourceRef
    status: str  # OK | NOT CHECKED | PROBLEM
    what: str
    detail: str
    selection: Selection | None = None

    def line(self) -> str:
        return f"{self.status:<12} {self.ref.label} = {self.ref.describe()}: {self.what}; {self.detail}"


def _selection_detail(selection: Selection) -> str:
    if selection.usable:
        text = f"usable ({len(selection.files)} needed files present)"
    else:
        parts = []
        if selection.missing:
            parts.append("missing " + ", ".join(selection.missing))
        parts += selection.problems
        text = "; ".join(parts)
    return text + "".join(f"; note: {n}" for n in selection.notes)


def _pipeline_note(ref: SourceRef, selection: Selection) -> None:
    # A folder of another pipeline class loads the wrong components or fails late.
    entry = FAMILIES.get(ref.family or "")
    if ref.layout != "pipeline" or entry is None or not entry.weights_class:
        return
    if not selection.pipeline_class:
        return
    wanted = entry.weights_class.partition(":")[2]
    if selection.pipeline_class != wanted:
        selection.notes.append(f"{MODEL_INDEX} is a {selection.pipeline_class}, "
                               f"family {ref.family} loads {wanted}")


def _single_file_detail(name: str) -> str:
    if name.endswith(SINGLE_FILE_SUFFIXES):
        return "usable (the file exists)"
    return f"the file exists, but spandrel reads {' / '.join(SINGLE_FILE_SUFFIXES)} files"


def check_source(ref: SourceRef, hub: Hub) -> SourceReport:
    """Whether one source is usable: its needed files present (local), or its repo,
    files and variant on the Hub (when the Hub answers)."""
    source = ref.source
    if source.stand_in:
        return SourceReport(ref, OK, STAND_IN, "built locally, nothing to download")
    location = locate(ref)
    what = location.what
    if location.error:
        return SourceReport(ref, PROBLEM, what, location.error)
    if source.kind == LOCAL and ref.layout == "single-file":
        return SourceReport(ref, OK, what, _single_file_detail(location.path.name))
    if source.kind == LOCAL:
        selection = select_for(ref, local_files(location.path), _local_json_reader(location.path))
        _pipeline_note(ref, selection)
        return SourceReport(ref, OK if selection.usable else PROBLEM, what,
                            _selection_detail(selection), selection)
    # The Hub.
    revision = ref.hub_revision
    try:
        if source.kind == HUB_FILE:
            problem = hub.file_problem(source, revision)
            if problem:
                return SourceReport(ref, PROBLEM, what, problem)
            return SourceReport(ref, OK, what,
                                _single_file_detail(PurePosixPath(source.path_in_repo).name),
                                Selection(files=[source.path_in_repo]))
        files = hub.list_files(source.repo_id, revision)
        selection = select_for(ref, files, hub.json_reader(source.repo_id, revision))
    except HubUnreachable as exc:
        reason = "" if hub_offline() else f": {exc}"
        return SourceReport(ref, NOT_CHECKED, what, f"not checked (offline{reason})")
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        return SourceReport(ref, PROBLEM, what, _hub_answer_error(exc, source.repo_id, revision))
    _pipeline_note(ref, selection)
    detail = _selection_detail(selection)
    if selection.usable:
        detail = f"repo exists, {detail}"
    return SourceReport(ref, OK if selection.usable else PROBLEM, what, detail, selection)


def check_sources(refs: Iterable[SourceRef], hub: Hub | None = None) -> list[SourceReport]:
    """Check every source (the Hub asked at most until it first fails to answer)."""
    hub = hub or Hub()
    return [check_source(ref, hub) for ref in refs]


# ---------------------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------------------


class FetchError(Exception):
    """A source that cannot be fetched (missing files, no Hub, no such repo)."""


@dataclass
class Fetched:
    """A fetched source: the path the config should now name, and the bytes it holds."""

    ref: SourceRef
    path: Path | None  # None: a stand-in, left as it is
    files: list[str]
    nbytes: int


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "source"


def _folder_key(ref: SourceRef, location: Location) -> tuple[tuple, str]:
    """(identity, wanted folder name) of the folder a source is fetched into: the same
    repo, revision and variant share one folder."""
    source, revision = ref.source, None
    if source.kind in (HUB, HUB_FILE):
        revision = ref.hub_revision
        base = source.repo_id.replace("/", "--")
        identity = (source.kind, source.repo_type, source.repo_id, revision, ref.variant,
                    ref.passed)
    elif ref.layout == "single-file":
        base = location.path.stem
        identity = ("file", str(location.path.resolve()))
    else:
        base = location.path.resolve().name
        identity = ("folder", str(location.path.resolve()), ref.variant, ref.passed)
    # Variants select different files: a folder each.
    name = "--".join(_safe_name(p) for p in (base, revision, ref.variant) if p)
    return identity, name


def _copy(files: Iterable[str], source: Path, dest: Path) -> None:
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and target.resolve() == (source / rel).resolve():
            continue  # fetching a folder onto itself
        shutil.copy2(source / rel, target)


def _size(dest: Path, files: Iterable[str]) -> int:
    return sum((dest / rel).stat().st_size for rel in files)


def one_line(text: object) -> str:
    """A (multi-line) error message as one line: 'head: a; b' for 'head:\\n  a\\n  b'."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    if not parts:
        return ""
    head, rest = parts[0], "; ".join(parts[1:])
    if not rest:
        return head
    return f"{head} {rest}" if head.endswith(":") else f"{head}; {rest}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def fetch_source(ref: SourceRef, dest: Path, hub: Hub) -> Fetched:
    """Fetch the files a source needs into ``dest``; returns what the config should name.

    Hub repos go through ``snapshot_download(allow_patterns=<the selection>)``, one Hub
    file through ``hf_hub_download`` (huggingface_hub's progress bars on a terminal), a
    local folder is copied with the same selection.
    """
    source = ref.source
    if source.stand_in:
        return Fetched(ref, None, [], 0)
    location = locate(ref)
    label = f"{ref.label} = {ref.describe()}"
    if location.error:
        raise FetchError(f"{label}: {location.error}")
    if source.kind == LOCAL and ref.layout == "single-file":
        files = [location.path.name]
        _copy(files, location.path.parent, dest)
        return Fetched(ref, dest / location.path.name, files, _size(dest, files))
    if source.kind == LOCAL:
        selection = select_for(ref, local_files(location.path), _local_json_reader(location.path))
        _raise_unusable(ref, selection)
        _copy(selection.files, location.path, dest)
        return Fetched(ref, dest, selection.files, _size(dest, selection.files))
    revision = ref.hub_revision
    try:
        if source.kind == HUB_FILE:
            problem = hub.file_problem(source, revision)
            if problem:
                raise FetchError(f"{label}: {problem}")
            selection = Selection(files=[source.path_in_repo])
        else:
            files = hub.list_files(source.repo_id, revision)
            selection = select_for(ref, files, hub.json_reader(source.repo_id, revision))
    except HubUnreachable as exc:
        raise FetchError(f"{label}: cannot reach the Hub ({exc})") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise FetchError(f"{label}: {_hub_answer_error(exc, source.repo_id, revision)}") from None
    _raise_unusable(ref, selection)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if source.kind == HUB_FILE:
            path = Path(hf_hub_download(source.repo_id, source.path_in_repo, revision=revision,
                                        repo_type=source.repo_type, local_dir=str(dest)))
            return Fetched(ref, path, selection.files, _size(dest, selection.files))
        snapshot_download(source.repo_id, revision=revision, allow_patterns=selection.files,
                          local_dir=str(dest))
    except Exception as exc:  # the network, the disk: said in one line, not a traceback
        raise FetchError(f"{label}: download failed ({_first_line(exc)})") from None
    return Fetched(ref, dest, selection.files, _size(dest, selection.files))


def _raise_unusable(ref: SourceRef, selection: Selection) -> None:
    if not selection.usable:
        raise FetchError(f"{ref.label} = {ref.describe()}: {_selection_detail(selection)}")


def fetch_sources(refs: Iterable[SourceRef], to: str | Path, hub: Hub | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[Fetched], list[str]]:
    """Fetch every source into a folder of its own under ``to``.

    Returns the fetched sources and the errors of those that could not be fetched.
    """
    hub = hub or Hub()
    root = Path(to).resolve()
    folders: dict[tuple, Path] = {}
    done: dict[tuple, Fetched] = {}
    fetched, errors = [], []
    for ref in refs:
        location = None if ref.source.stand_in else locate(ref)
        if location is None or location.error:
            dest = root
            key = None
        else:
            identity, name = _folder_key(ref, location)
            if identity not in folders:
                taken = set(folders.values())
                candidate, n = root / name, 2
                while candidate in taken:
                    candidate, n = root / f"{name}-{n}", n + 1
                folders[identity] = candidate
            dest = folders[identity]
            key = (identity, ref.source.path_in_repo, ref.layout, ref.config_files)
        try:
            if key is not None and key in done:
                result = Fetched(ref, done[key].path, done[key].files, 0)  # counted once
            else:
                result = fetch_source(ref, dest, hub)
                if key is not None:
                    done[key] = result
        except (FetchError, OSError) as exc:
            message = str(exc) if isinstance(exc, FetchError) else f"{ref.label}: {_first_line(exc)}"
            errors.append(message)
            log(f"{PROBLEM:<12} {message}")
            continue
        fetched.append(result)
        if result.path is None:
            log(f"{'STAND-IN':<12} {ref.label} = {ref.source}: stays as it is (built locally)")
        else:
            log(f"{'FETCHED':<12} {ref.label} = {ref.describe()} -> {result.path} "
                f"({len(result.files)} files, {result.nbytes} bytes)")
    return fetched, errors


class _PlainDumper(yaml.SafeDumper):
    """Writes anchored values out in full rather than as &id001 / *id001."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def rewrite_config(serve_config: dict[str, Any], fetched: Iterable[Fetched]) -> dict[str, Any]:
    """Point the fetched sources of a Serve config (as read) at their local copies.

    Everything else is kept, in its order; a safety section that relied on the default
    source gets the key.
    """
    for item in fetched:
        if item.path is None:
            continue
        node = serve_config["applications"][item.ref.app_index].setdefault("args", {})
        *parents, last = item.ref.key
        for part in parents:
            node = node[part]
        node[last] = str(item.path.resolve())
    return serve_config


def write_config(serve_config: dict[str, Any], out: str | Path, header: str = "") -> Path:
    """Write a Serve config as YAML, keys in their order."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + dump_config(serve_config), encoding="utf-8")
    return out


def dump_config(serve_config: dict[str, Any]) -> str:
    """A Serve config as YAML text, keys in their order."""
    return yaml.dump(serve_config, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def tiny_twin(config_path: str | Path) -> dict[str, Any]:
    """The Serve config at ``config_path`` with every weights source replaced by its tiny one.

    Model, preview-decoder, VAE and safety-checker sources become ``tiny:<family>`` and
    LoRAs ``tiny:lora/<family>/<name>`` (revisions and variants go: tiny models have none).
    Everything else is kept as written: GPU and CPU requests, replica counts, batching,
    limits and dtypes (a replica without a GPU runs in its ``cpu_dtype``). It runs on any
    Ray cluster that declares the GPUs it asks for (``ray start --head --num-gpus 4``).
    Raises :class:`~serve_app.config.ConfigError` on an unreadable or invalid config.
    """
    from serve_app.config import ConfigError, load_app_config

    serve_config = read_serve_config(config_path)
    refs = [ref for index, (name, app) in enumerate(apps_of(serve_config))
            for ref in sources_of(app, index, name)]  # validates every application first
    for ref in refs:
        if ref.family is None:
            raise ConfigError(f"{ref.label}: {str(ref.source)!r} is no registered family; "
                              "it has no tiny twin")
        node = serve_config["applications"][ref.app_index].setdefault("args", {})
        *parents, last = ref.key
        for part in parents:
            node = node[part]
        node[last] = f"tiny:{ref.family}"
        if last == "source":
            node.pop("revision", None)
            node.pop("variant", None)
    for application in serve_config["applications"]:
        args = application.setdefault("args", {})
        for model in args.get("models") or []:
            for adapter in model.get("loras") or []:
                adapter["source"] = f"tiny:lora/{model['family']}/{adapter['name']}"
            model.pop("allow_hub_loras", None)  # tiny models take tiny LoRAs only
        try:
            load_app_config(args)  # what is written must still load
        except ConfigError as exc:
            raise ConfigError(f"the tiny twin of {config_path} is invalid: {exc}") from None
    return serve_config
