"""Weights sources of a config: which files each needs, whether they are there, fetching them.

Every source of an application (each model's ``source``, ``preview_decoder`` and ``vae``,
and ``safety.source``) is one of:

- ``tiny:<family>``: built locally at start, nothing to download;
- ``sim:<family>``: a simulated accelerator for benchmarks (deployments/sim.py), no weights;
- a local folder (a local ``.pth`` / ``.safetensors`` file for single-file families);
- a Hub repo id, or ``hf://OWNER/REPO/PATH[@REVISION]`` for one file of a repo.

:func:`select_files` decides which files of a listing a loader needs, from the family's
layout in the registry (``deployments/families.py``) and, for pipelines, the components
named in ``model_index.json``. ``serve-app check`` and ``serve-app fetch`` both use it, on a
local folder and on a Hub listing alike, so what is checked is exactly what is fetched.

Nothing here imports torch or reaches the Hub unless asked to (a Hub listing).
"""

from __future__ import annotations

import json
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
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from deployments.families import FAMILIES, SAFETY_CHECKER, Family, component_for, family_of_source

# How long one Hub call may take before the Hub counts as unreachable for the whole run.
DEFAULT_HUB_TIMEOUT_S = 10.0

# Weight files the diffusers and transformers loaders look for (the regexes of
# diffusers.pipelines.pipeline_loading_utils.variant_compatible_siblings): a folder's other
# files (openvino_model.bin, model.onnx, flax_model.msgpack, a root-level single-file
# checkpoint such as sdxl_vae.safetensors) are never loaded from a folder.
_SHARD = r"-\d{5}-of-\d{5}"
_WEIGHTS_RE = re.compile(
    rf"^(?P<base>diffusion_pytorch_model|pytorch_model|model)(?:{_SHARD})?"
    rf"(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:{_SHARD})?\.(?P<ext>safetensors|bin)$"
)
_INDEX_RE = re.compile(
    r"^(?P<base>diffusion_pytorch_model|pytorch_model|model)\.(?P<ext>safetensors|bin)"
    r"(?:\.(?P<legacy>[A-Za-z0-9_]+))?\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$"
)
# Weights file names by library, to name what is missing.
_WEIGHTS_BASE = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
# Files a tokenizer may be saved as (slow or fast, BPE, WordPiece or SentencePiece).
_TOKENIZER_FILES = frozenset({
    "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
})
SINGLE_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


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
    source: str
    layout: str  # pipeline | model | single-file (the registry's layout)
    family: str | None = None
    revision: str | None = None
    variant: str | None = None

    @property
    def config_files(self) -> tuple[str, ...]:
        """Model layout: the configuration files the loader reads beside the weights."""
        return model_config_files(FAMILIES.get(self.family) if self.family else None)

    def describe(self) -> str:
        extras = [f"revision {self.revision}"] if self.revision else []
        extras += [f"variant {self.variant}"] if self.variant else []
        return self.source + (f" [{', '.join(extras)}]" if extras else "")


def model_config_files(entry: Family | None) -> tuple[str, ...]:
    """Configuration files of a one-model folder: those the registry keeps for the real
    model (the safety checker has its image processor's beside its own), else config.json."""
    if entry is not None and entry.config_folder.is_dir():
        names = sorted(p.name for p in entry.config_folder.glob("*.json"))
        if names:
            return tuple(names)
    return ("config.json",)


def _component_family(model_family: Family, source: str, capability: str) -> str | None:
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
        refs.append(SourceRef(app_index, app_name, ("models", i, "source"), f"{where}.source",
                              model.source, entry.layout, entry.name, model.revision, model.variant))
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


def load_apps(config_path: str | Path) -> list[tuple[str, Any]]:
    """Read a Serve config file and validate every application's args.

    Returns ``(application name, AppConfig)`` pairs; raises
    :class:`~serve_app.config.ConfigError` on an invalid config.
    """
    from serve_app.config import ConfigError, load_app_config
    from serve_app.tools.launch import load_serve_config

    try:
        serve_config = load_serve_config(config_path)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {config_path}: {exc}") from None
    applications = (serve_config or {}).get("applications") if isinstance(serve_config, dict) else None
    if not applications:
        raise ConfigError(f"{config_path}: no 'applications' in this Serve config")
    apps = []
    for index, application in enumerate(applications):
        name = application.get("name", f"applications[{index}]")
        try:
            apps.append((name, load_app_config(application.get("args") or {})))
        except ConfigError as exc:
            raise ConfigError(f"application {name!r}: {exc}") from None
    return apps


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
            self.files.append(path)
            return True
        self.missing.append(path)
        return False


def component_kind(name: str, class_name: str) -> str:
    """What a ``model_index.json`` component is: scheduler, tokenizer, processor or model."""
    if class_name.endswith("Scheduler") or name.endswith("scheduler"):
        return "scheduler"
    if "Tokenizer" in class_name:
        return "tokenizer"
    if class_name.endswith(("ImageProcessor", "FeatureExtractor", "Processor")):
        return "processor"
    return "model"


def _by_folder(files: Iterable[str]) -> dict[str, list[str]]:
    folders: dict[str, list[str]] = {}
    for path in files:
        parent = str(PurePosixPath(path).parent)
        folders.setdefault("" if parent == "." else parent, []).append(PurePosixPath(path).name)
    return folders


def _select_weights(
    folder: str, names: list[str], present: set[str], variant: str | None, library: str | None,
    read_json: Callable[[str], Any] | None, selection: Selection,
) -> bool | None:
    """Add the weight files of one model folder to ``selection``.

    Safetensors are preferred over .bin; with a variant, its files when the folder has them,
    else the default ones (diffusers falls back per component). Returns whether the
    variant was found (None without a variant or without weights)."""
    prefix = f"{folder}/" if folder else ""
    weights = [(n, m) for n in names if (m := _WEIGHTS_RE.match(n))]
    indexes = [(n, m) for n in names if (m := _INDEX_RE.match(n))]

    def variant_of(match: re.Match) -> str | None:
        return match.groupdict().get("legacy") or match.group("variant")

    found_variant = None
    chosen = []
    if variant is not None:
        chosen = [(n, m) for n, m in weights if variant_of(m) == variant]
        found_variant = bool(chosen)
    if not chosen:
        chosen = [(n, m) for n, m in weights if variant_of(m) is None]
    if not chosen:
        base = _WEIGHTS_BASE.get(library or "")
        wanted = (f"{base}.safetensors" if base
                  else "diffusion_pytorch_model.safetensors or model.safetensors")
        selection.missing.append(f"{prefix}{wanted} (weights)")
        return None
    ext = "safetensors" if any(m.group("ext") == "safetensors" for _, m in chosen) else "bin"
    wanted_variant = variant_of(chosen[0][1])
    picked = sorted(n for n, m in chosen if m.group("ext") == ext)
    picked_indexes = sorted(n for n, m in indexes
                            if m.group("ext") == ext and variant_of(m) == wanted_variant)
    selection.files += [prefix + n for n in picked + picked_indexes]
    if not picked_indexes and any(re.search(_SHARD, n) for n in picked):
        selection.missing.append(f"{prefix}{chosen[0][1].group('base')}.{ext}.index.json")
    # A sharded checkpoint is usable only with every shard its index names.
    for index in picked_indexes:
        if read_json is None:
            continue
        try:
            shards = set(read_json(prefix + index).get("weight_map", {}).values())
        except HubUnreachable:
            raise
        except Exception:  # an unreadable index is the loader's error to report
            continue
        selection.missing += sorted(prefix + s for s in shards if prefix + s not in present)
    if variant is not None and not found_variant:
        selection.notes.append(f"{folder or 'weights'}: no {variant} weights, the default ones load")
    return found_variant


def _select_model(
    folder: str, names: list[str], present: set[str], config_files: Iterable[str],
    variant: str | None, library: str | None, read_json, selection: Selection,
) -> bool | None:
    prefix = f"{folder}/" if folder else ""
    for config in config_files:
        selection._need(prefix + config, present)
    return _select_weights(folder, names, present, variant, library, read_json, selection)


def select_files(
    layout: str,
    files: Iterable[str],
    read_json: Callable[[str], Any] | None = None,
    *,
    variant: str | None = None,
    config_files: Iterable[str] = ("config.json",),
    filename: str | None = None,
) -> Selection:
    """The files of a source (a folder's or a repo's listing) that its loader needs.

    ``layout`` is the registry's: ``pipeline`` (``model_index.json``, and for every
    non-null component its config, scheduler, tokenizer or preprocessor files and, for
    models, its weights), ``model`` (``config_files`` and weights at the root) or
    ``single-file`` (``filename``). ``read_json(path)`` reads a file of the listing
    (``model_index.json``, shard indexes). Weights: safetensors rather than .bin; with a
    ``variant``, its files where a component has them. Nothing else is ever selected:
    no root-level single-file checkpoints, .ckpt, .onnx, flax, README or images.
    """
    present = set(files)
    folders = _by_folder(present)
    selection = Selection()
    if layout == "single-file":
        if filename is None:
            raise ValueError("single-file layout needs a filename")
        selection._need(filename, present)
        return selection
    if layout == "model":
        _select_model("", folders.get("", []), present, config_files, variant, None, read_json,
                      selection)
        return selection
    if layout != "pipeline":
        raise ValueError(f"unknown layout {layout!r}")

    if not selection._need("model_index.json", present):
        return selection
    try:
        index = read_json("model_index.json") if read_json else None
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except HubUnreachable:
        raise
    except Exception as exc:
        selection.problems.append(f"model_index.json unreadable: {exc}")
        return selection
    selection.pipeline_class = index.get("_class_name")
    variants_found = []
    for name, entry in index.items():
        # Components are [library, class]; [null, null] is a component left out, and the
        # other keys are pipeline settings (requires_safety_checker, ...).
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, class_name = entry
        if library is None or class_name is None:
            continue
        names = folders.get(name, [])
        kind = component_kind(name, str(class_name))
        if kind == "scheduler":
            selection._need(f"{name}/scheduler_config.json", present)
        elif kind == "processor":
            selection._need(f"{name}/preprocessor_config.json", present)
        elif kind == "tokenizer":
            _select_tokenizer(name, names, present, selection)
        else:
            found = _select_model(name, names, present, ("config.json",), variant, library,
                                  read_json, selection)
            if found is not None:
                variants_found.append(found)
    if variant is not None and variants_found and not any(variants_found):
        # diffusers refuses a variant that no component has.
        selection.notes = [n for n in selection.notes if f"no {variant} weights" not in n]
        selection.problems.append(f"variant {variant!r} not found: no component has "
                                  f"*.{variant}.safetensors (or .bin) weights")
    return selection


def _select_tokenizer(name: str, names: list[str], present: set[str], selection: Selection) -> None:
    picked = sorted(n for n in names if n in _TOKENIZER_FILES or n.endswith((".model", ".tiktoken")))
    selection.files += [f"{name}/{n}" for n in picked]
    if "tokenizer_config.json" not in picked:
        selection.missing.append(f"{name}/tokenizer_config.json")
    has_vocab = ("tokenizer.json" in picked or "vocab.txt" in picked
                 or any(n.endswith(".model") for n in picked)
                 or ("vocab.json" in picked and "merges.txt" in picked))
    if not has_vocab:
        selection.missing.append(f"{name}/tokenizer.json (or vocab.json + merges.txt)")


def select_for(ref: SourceRef, files: Iterable[str], read_json: Callable[[str], Any] | None,
               filename: str | None = None) -> Selection:
    """:func:`select_files` with a source's layout, variant and configuration files."""
    return select_files(ref.layout, files, read_json, variant=ref.variant,
                        config_files=ref.config_files, filename=filename)


# ---------------------------------------------------------------------------------------
# Where a source is
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where a source's files are: kind is tiny, sim, local-folder, local-file, hub or hub-file."""

    kind: str
    path: Path | None = None  # local
    repo: str | None = None  # hub
    filename: str | None = None  # hub-file: the file in the repo
    revision: str | None = None
    error: str | None = None  # a source that is none of these


def parse_hf_url(source: str) -> tuple[str, str, str | None]:
    """``hf://OWNER/REPO/PATH[@REVISION]`` as (repo, path, revision)."""
    reference, _, revision = source.removeprefix("hf://").partition("@")
    parts = reference.split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"expected hf://OWNER/REPO/PATH, got {source!r}")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def locate(ref: SourceRef) -> Location:
    """Classify a source as the loaders do: a local path when it exists, else a Hub id."""
    source = ref.source
    if source.startswith("tiny:"):
        return Location("tiny")
    if source.startswith("sim:"):
        return Location("sim")
    if ref.layout == "single-file":
        # deployments/esrgan.py: hf:// is one Hub file, anything else a local path.
        if source.startswith("hf://"):
            try:
                repo, filename, revision = parse_hf_url(source)
            except ValueError as exc:
                return Location("hub-file", error=str(exc))
            return Location("hub-file", repo=repo, filename=filename, revision=revision or ref.revision)
        path = Path(source).expanduser()
        if path.is_dir():
            return Location("local-file", path=path,
                            error="is a folder; expected a .pth or .safetensors file")
        if not path.is_file():
            return Location("local-file", path=path, error="no such file")
        return Location("local-file", path=path)
    if source.startswith("hf://"):
        return Location("hub", error="hf:// names one file; this loader takes a Hub repo id or a folder")
    path = Path(source).expanduser()
    if path.is_dir():
        return Location("local-folder", path=path)
    if path.exists():
        return Location("local-folder", path=path, error="is a file; expected a folder")
    try:
        validate_repo_id(source)
    except HFValidationError:
        return Location("local-folder", path=path, error="no such folder (and not a Hub repo id)")
    return Location("hub", repo=source, revision=ref.revision)


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
    is not asked again (one timeout per run, not one per source)."""

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
        """``HfApi().list_repo_files``, with the run's timeout."""
        key = (repo, revision)
        if key not in self._listings:
            self._listings[key] = list(self._call(
                lambda: HfApi().list_repo_files(repo, revision=revision)))
        return self._listings[key]

    def json_reader(self, repo: str, revision: str | None) -> Callable[[str], Any]:
        """Read a small JSON file of a repo (downloaded to the Hub cache)."""
        def read(path: str) -> Any:
            local = self._call(lambda: hf_hub_download(repo, path, revision=revision))
            return json.loads(Path(local).read_text(encoding="utf-8"))

        return read


def _hub_answer_error(exc: Exception, repo: str, revision: str | None) -> str:
    if isinstance(exc, GatedRepoError):
        return f"repo {repo} is gated: accept its terms on the Hub and log in (HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} does not exist in {repo}"
    return f"repo {repo} does not exist (or is private: log in with HF_TOKEN)"


# ---------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------

OK, NOT_CHECKED, PROBLEM = "OK", "NOT CHECKED", "PROBLEM"


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
        selection.notes.append(f"model_index.json is a {selection.pipeline_class}, "
                               f"family {ref.family} loads {wanted}")


def check_source(ref: SourceRef, hub: Hub) -> SourceReport:
    """Whether one source is usable: its needed files present (local), or its repo,
    files and variant on the Hub (when the Hub answers)."""
    location = locate(ref)
    if location.kind == "tiny":
        name = ref.source.removeprefix("tiny:")
        if name not in FAMILIES:
            return SourceReport(ref, PROBLEM, "tiny source", f"unknown tiny family {name!r}")
        return SourceReport(ref, OK, "tiny source", "built locally, nothing to download")
    if location.kind == "sim":
        return SourceReport(ref, OK, "simulated accelerator",
                            "benchmarks only (deployments/sim.py), nothing to download")
    what = {"local-folder": f"local {ref.layout} folder", "local-file": "local file",
            "hub": "Hub repo", "hub-file": "Hub file"}[location.kind]
    if location.error:
        return SourceReport(ref, PROBLEM, what, location.error)
    if location.kind == "local-file":
        return SourceReport(ref, OK, what, _single_file_detail(location.path.name))
    if location.kind == "local-folder":
        selection = select_for(ref, local_files(location.path), _local_json_reader(location.path))
        _pipeline_note(ref, selection)
        return SourceReport(ref, OK if selection.usable else PROBLEM, what,
                            _selection_detail(selection), selection)
    # The Hub.
    try:
        files = hub.list_files(location.repo, location.revision)
        filename = location.filename
        selection = select_for(ref, files, hub.json_reader(location.repo, location.revision), filename)
    except HubUnreachable as exc:
        reason = "" if hub_offline() else f": {exc}"
        return SourceReport(ref, NOT_CHECKED, what, f"not checked (offline{reason})")
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        return SourceReport(ref, PROBLEM, what, _hub_answer_error(exc, location.repo, location.revision))
    _pipeline_note(ref, selection)
    detail = _selection_detail(selection)
    if selection.usable and location.kind == "hub-file":
        detail = _single_file_detail(PurePosixPath(location.filename).name)
    elif selection.usable:
        detail = f"repo exists, {detail}"
    return SourceReport(ref, OK if selection.usable else PROBLEM, what, detail, selection)


def _single_file_detail(name: str) -> str:
    if name.endswith(SINGLE_FILE_SUFFIXES):
        return "usable (the file exists)"
    return f"the file exists, but spandrel reads {' / '.join(SINGLE_FILE_SUFFIXES)} files"


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
    path: Path | None  # None: a tiny source, left as it is
    files: list[str]
    nbytes: int


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "source"


def _folder_key(ref: SourceRef, location: Location) -> tuple[tuple, str]:
    """(identity, wanted folder name) of the folder a source is fetched into: the same
    repo, revision and variant share one folder."""
    if location.kind in ("hub", "hub-file"):
        base = location.repo.replace("/", "--")
        identity = (location.kind == "hub-file", location.repo, location.revision, ref.variant)
    elif location.kind == "local-file":
        base = location.path.stem
        identity = ("file", str(location.path.resolve()))
    else:
        base = location.path.resolve().name
        identity = ("folder", str(location.path.resolve()), ref.variant)
    # Variants select different files: a folder each.
    name = "--".join(_safe_name(p) for p in (base, location.revision, ref.variant) if p)
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


def fetch_source(ref: SourceRef, dest: Path, hub: Hub) -> Fetched:
    """Fetch the files a source needs into ``dest``; returns what the config should name.

    Hub repos go through ``snapshot_download(allow_patterns=<the selection>)``, one Hub
    file through ``hf_hub_download``, a local folder is copied with the same selection.
    """
    location = locate(ref)
    if location.kind in ("tiny", "sim"):
        return Fetched(ref, None, [], 0)
    if location.error:
        raise FetchError(f"{ref.label} = {ref.describe()}: {location.error}")
    if location.kind == "local-file":
        files = [location.path.name]
        _copy(files, location.path.parent, dest)
        return Fetched(ref, dest / location.path.name, files, _size(dest, files))
    if location.kind == "local-folder":
        selection = select_for(ref, local_files(location.path), _local_json_reader(location.path))
        _raise_unusable(ref, selection)
        _copy(selection.files, location.path, dest)
        return Fetched(ref, dest, selection.files, _size(dest, selection.files))
    try:
        files = hub.list_files(location.repo, location.revision)
        selection = select_for(ref, files, hub.json_reader(location.repo, location.revision),
                               location.filename)
    except HubUnreachable as exc:
        raise FetchError(f"{ref.label} = {ref.describe()}: cannot reach the Hub ({exc})") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise FetchError(f"{ref.label} = {ref.describe()}: "
                         f"{_hub_answer_error(exc, location.repo, location.revision)}") from None
    _raise_unusable(ref, selection)
    dest.mkdir(parents=True, exist_ok=True)
    if location.kind == "hub-file":
        path = Path(hf_hub_download(location.repo, location.filename, revision=location.revision,
                                    local_dir=str(dest)))
        return Fetched(ref, path, selection.files, _size(dest, selection.files))
    snapshot_download(location.repo, revision=location.revision, allow_patterns=selection.files,
                      local_dir=str(dest))
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
        location = locate(ref)
        if location.kind in ("tiny", "sim") or location.error:
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
            key = (identity, location.filename, ref.layout, ref.config_files)
        try:
            if key is not None and key in done:
                result = Fetched(ref, done[key].path, done[key].files, 0)  # counted once
            else:
                result = fetch_source(ref, dest, hub)
                if key is not None:
                    done[key] = result
        except FetchError as exc:
            errors.append(str(exc))
            log(f"{PROBLEM:<12} {exc}")
            continue
        fetched.append(result)
        if result.path is None:
            log(f"{'TINY':<12} {ref.label} = {ref.source}: stays as it is (built locally)")
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
    """
    from serve_app.config import ConfigError, load_app_config
    from serve_app.tools.launch import load_serve_config

    refs = config_sources(config_path)  # validates every application first
    serve_config = load_serve_config(config_path)
    for ref in refs:
        if ref.family is None:
            raise ConfigError(f"{ref.label}: {ref.source!r} is no registered family; "
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
