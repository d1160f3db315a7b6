"""Weights sources: the one :class:`Source` type and the registry of source kinds.

A source is written in a config as one of:

- a Hub repo id (``stabilityai/stable-diffusion-xl-base-1.0``) or a local folder;
- ``hf://[TYPE/]ID[@REVISION]/PATH``: one file of a Hub repo, in huggingface_hub's own URI
  grammar, parsed by huggingface_hub's own parser (``parse_hf_uri``);
- ``KIND:REST`` for a source kind registered by a plug-in: the project's stand-ins register
  ``tiny:`` and ``sim:`` (``deployments/standins``). A stand-in names what it stands for,
  ``KIND:<family>`` for a model and ``KIND:lora/<family>/<name>`` for a LoRA adapter.

:meth:`Source.parse` is the only place a source string is read; the config parses each
source once, when it is validated, and the pipeline spec carries the :class:`Source`.

Loading goes through :func:`local_path` (what ``from_pretrained``, ``load_lora_weights``
or spandrel take: a folder or file on this machine, or a Hub id they download) and
:func:`stand_in_model` (a model that a source kind supplies whole, instead of weights). A
kind is an object with ``local_path(source)`` and ``model(source, family)`` (None when it
supplies weights rather than a model). Kinds register through the ``serve_app.source_kinds``
entry points (``pyproject.toml``), imported the first time a source of theirs is loaded, or
by :func:`register_source_kind`. Nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

ENTRY_POINT_GROUP = "serve_app.source_kinds"

# The kinds every install knows. A plug-in kind is any other "KIND:" prefix.
HUB, HUB_FILE, LOCAL = "hub", "hub-file", "local"
_BUILT_IN = (HUB, HUB_FILE, LOCAL)
_KIND_PREFIX = re.compile(r"^(?P<kind>[a-z][a-z0-9_-]*):(?!//)(?P<rest>.*)$", re.S)
_STAND_IN_LORA = re.compile(r"^lora/(?P<family>[^/]+)/(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)$")


@dataclass(frozen=True, eq=False)
class Source:
    """One weights source, parsed. ``text`` is the source as written (``str(source)``); a
    source equals its text, so configs, logs and tests may name it as written."""

    text: str
    kind: str  # hub | hub-file | local | a registered plug-in kind (tiny, sim)
    repo_id: str | None = None  # hub, hub-file
    repo_type: str = "model"
    revision: str | None = None  # hub-file: from the URI (a Hub id's is the config's `revision`)
    path_in_repo: str | None = None  # hub-file
    rest: str | None = None  # plug-in kinds: what follows "KIND:"

    @classmethod
    def parse(cls, text: str) -> Source:
        """Parse a source as written in a config; ValueError names what is wrong."""
        if isinstance(text, Source):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a weights source must be a non-empty string")
        text = text.strip()
        if text.startswith("hf://"):
            return cls._parse_hf(text)
        match = _KIND_PREFIX.match(text)
        if match:
            kind = match.group("kind")
            known = source_kinds()
            if kind not in known:
                raise ValueError(
                    f"{text!r}: unknown source kind {kind + ':'!r}; known kinds: "
                    f"{', '.join(k + ':' for k in known) or 'none installed'} (or a Hub id, "
                    "a local folder, hf://ID[@REVISION]/PATH)"
                )
            if not match.group("rest"):
                raise ValueError(f"{text!r}: {kind}: names nothing (use {kind}:<family>)")
            return cls(text, kind, rest=match.group("rest"))
        if text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().exists():
            return cls(text, LOCAL)
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(text)
        except HFValidationError:
            return cls(text, LOCAL)  # a relative path that is not here (yet): checked at load
        return cls(text, HUB, repo_id=text)

    @classmethod
    def hub(cls, repo_id: str) -> Source:
        """A Hub repo named by a client (a Hub LoRA): a Hub source whatever folders exist
        here (:meth:`parse` would take an existing folder of that name). It is never handed
        to a loader as it is (diffusers' ``load_lora_weights`` reads a name that is a local
        folder before it asks the Hub): deployments/runtime/loras.py downloads its file through
        huggingface_hub's API and loads that file from the Hub cache."""
        return cls(repo_id, HUB, repo_id=repo_id)

    @classmethod
    def _parse_hf(cls, text: str) -> Source:
        from huggingface_hub.utils import parse_hf_uri

        try:
            uri = parse_hf_uri(text)
        except ValueError as exc:  # HfUriError
            raise ValueError(f"{text!r}: {exc}") from None
        if getattr(uri, "type", "model") == "bucket":
            raise ValueError(f"{text!r}: a bucket is not a weights source")
        if "@" in uri.path_in_repo:
            raise ValueError(
                f"{text!r}: the revision goes right after the repo id, as huggingface_hub "
                f"writes it: hf://{uri.id}@REVISION/PATH"
            )
        if not uri.path_in_repo:
            raise ValueError(
                f"{text!r}: hf:// names one file of a repo (hf://ID[@REVISION]/PATH); "
                f"for a whole repo write its id ({uri.id})"
            )
        return cls(text, HUB_FILE, repo_id=uri.id, repo_type=uri.type, revision=uri.revision,
                   path_in_repo=uri.path_in_repo)

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.text == other
        if isinstance(other, Source):
            return (self.text, self.kind) == (other.text, other.kind)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.text)

    @property
    def stand_in(self) -> bool:
        """A plug-in kind (tiny, sim): not real weights."""
        return self.kind not in _BUILT_IN

    @property
    def family(self) -> str | None:
        """The family a stand-in model source stands for (``KIND:<family>``), else None."""
        return self.rest if self.stand_in and "/" not in self.rest else None

    @property
    def lora(self) -> tuple[str, str] | None:
        """(family, name) of a stand-in LoRA (``KIND:lora/<family>/<name>``), else None."""
        match = _STAND_IN_LORA.match(self.rest or "") if self.stand_in else None
        return (match.group("family"), match.group("name")) if match else None


# ---------------------------------------------------------------------------------------
# The registry of plug-in kinds
# ---------------------------------------------------------------------------------------


class SourceKind(Protocol):
    """What a plug-in source kind does for the loaders."""

    def local_path(self, source: Source) -> str:
        """A folder or file on this machine holding the source's weights."""

    def model(self, source: Source, family: str) -> Any | None:
        """A whole stand-in model for ``family`` (not weights to load), or None."""


_KINDS: dict[str, SourceKind] = {}


def register_source_kind(name: str, kind: SourceKind) -> None:
    """Register a plug-in kind (``name:`` sources). Entry points do this on first use."""
    _KINDS[name] = kind


@lru_cache(maxsize=1)
def _installed_kinds() -> frozenset[str]:
    # The installed distributions' metadata, read once per process (each source parses).
    return frozenset(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def source_kinds() -> list[str]:
    """The plug-in kinds known here: registered, or installed as entry points."""
    return sorted(set(_KINDS) | _installed_kinds())


def source_kind(source: Source) -> SourceKind:
    """The plug-in kind of a stand-in source, imported from its entry point on first use."""
    if source.kind not in _KINDS:
        for ep in entry_points(group=ENTRY_POINT_GROUP, name=source.kind):
            register_source_kind(source.kind, ep.load())
            break
        else:
            raise ValueError(f"no source kind {source.kind!r} is installed (source {source})")
    return _KINDS[source.kind]


# ---------------------------------------------------------------------------------------
# What the loaders call
# ---------------------------------------------------------------------------------------


def local_path(source: Source) -> str:
    """What ``from_pretrained``, ``load_lora_weights`` or spandrel take for ``source``: a
    stand-in built (once) into a local folder or file, one Hub file downloaded (to the Hub
    cache), a Hub id as it is (the loader downloads it), or the local path."""
    if source.stand_in:
        return str(source_kind(source).local_path(source))
    if source.kind == HUB_FILE:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=source.repo_id, filename=source.path_in_repo,
                               revision=source.revision, repo_type=source.repo_type)
    if source.kind == LOCAL:
        return str(Path(source.text).expanduser())
    return source.text


def stand_in_model(source: Source, family: str) -> Any | None:
    """The model a stand-in kind supplies whole for ``family`` (the simulated accelerator),
    or None: weights to load as usual."""
    return source_kind(source).model(source, family) if source.stand_in else None
