"""The Hub as one run of ``serve-app check`` or ``fetch`` sees it: asked with a timeout,
its listings cached, and not asked again once it has failed to answer (one timeout per
run, not one per source). huggingface_hub does the asking."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from deployments.sources import Source

# How long one Hub call may take before the Hub counts as unreachable for the whole run.
DEFAULT_HUB_TIMEOUT_S = 10.0


class HubUnreachable(Exception):
    """The Hub cannot be asked (offline mode, no answer, no network)."""


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


def answer_error(exc: Exception, repo: str, revision: str | None) -> str:
    if isinstance(exc, GatedRepoError):
        return f"repo {repo} is gated: accept its terms on the Hub and log in (HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return _no_revision(repo, revision)
    return _no_repo(repo)
