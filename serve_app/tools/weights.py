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

One module, over 400 lines: check, fetch and tiny-config walk the same selection of a
config's files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from deployments.families import FAMILIES, SAFETY_CHECKER, Family, component_for, family_of_source
from deployments.sources import HUB, HUB_FILE, LOCAL, Source, local_path
from serve_app.tools.hub import Hub, HubUnreachable, answer_error, hub_offline
from serve_app.tools.selection import MODEL_INDEX, Selection, select_files

# The files spandrel's ModelLoader.load_from_file reads (spandrel 0.4 has no list to import).
SINGLE_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")



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
        # deployments/runtime/loading.py passes a `vae:` override to from_pretrained as `vae=`.
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
        return SourceReport(ref, PROBLEM, what, answer_error(exc, source.repo_id, revision))
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
        raise FetchError(f"{label}: {answer_error(exc, source.repo_id, revision)}") from None
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
