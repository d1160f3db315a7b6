"""The API keys: read from the environment or from a file (a mounted Kubernetes Secret), never
from the Serve config, which ``serve config`` and the dashboard show to anyone who can read them.

``SERVE_APP_API_KEYS`` holds keys separated by commas; ``SERVE_APP_API_KEYS_FILE`` names a file
of keys separated by commas or newlines (blank lines and lines starting with ``#`` are skipped).
Both may be set: the keys of both are accepted. An entry is ``KEY``, or ``NAME:KEY`` to give the
key a name that the config can refer to (``safety.allow_low_keys``) without holding the key; the
name ends at the first ``:``, so a key containing one must be given a name.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

API_KEYS_ENV = "SERVE_APP_API_KEYS"
API_KEYS_FILE_ENV = "SERVE_APP_API_KEYS_FILE"

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def owner_of(api_key: bytes | None) -> str:
    """Who a request or a job belongs to: a hash of the key it bore ("" with keys off)."""
    return hashlib.sha256(api_key).hexdigest() if api_key else ""


class KeysError(ValueError):
    """The API keys' environment cannot be read as keys (a missing file, a bad entry)."""


@dataclass(frozen=True)
class ApiKeys:
    """The keys a request may bear, and the names some of them were given."""

    keys: tuple[bytes, ...] = field(default=(), repr=False)  # never in a repr or a log
    names: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def owners_named(self, names: Iterable[str]) -> frozenset[str]:
        """The owners (:func:`owner_of` the key) of the keys given these names; a name no
        key has is a :class:`KeysError`."""
        names = list(names)
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            raise KeysError(
                f"no API key is named {', '.join(map(repr, unknown))} (name a key with an entry "
                f"NAME:KEY in {API_KEYS_ENV} or {API_KEYS_FILE_ENV})")
        return frozenset(owner_of(self.names[name]) for name in names)


def _entries(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [entry.strip() for line in lines for entry in line.split(",") if entry.strip()]


def parse_keys(entries: Iterable[str], where: str) -> ApiKeys:
    keys: list[bytes] = []
    names: dict[str, bytes] = {}
    for entry in entries:
        name, sep, key = entry.partition(":")
        if not sep:
            name, key = "", entry
        elif not _NAME.fullmatch(name) or not key:
            raise KeysError(f"{where}: an entry NAME:KEY needs a name of letters, digits, '_', "
                            "'.' or '-', and a key (the entry itself is not shown)")
        if name:
            if name in names and names[name] != key.encode():
                raise KeysError(f"{where}: two keys are named {name!r}")
            names[name] = key.encode()
        keys.append(key.encode())
    return ApiKeys(tuple(dict.fromkeys(keys)), names)


def load_api_keys(environ: Mapping[str, str] | None = None) -> ApiKeys:
    """The keys of ``SERVE_APP_API_KEYS`` and of the file ``SERVE_APP_API_KEYS_FILE`` names."""
    environ = os.environ if environ is None else environ
    entries = [(API_KEYS_ENV, _entries(environ.get(API_KEYS_ENV, "")))]
    path = environ.get(API_KEYS_FILE_ENV, "").strip()
    if path:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise KeysError(f"{API_KEYS_FILE_ENV}={path}: cannot read it ({exc.strerror})") from None
        entries.append((f"{API_KEYS_FILE_ENV}={path}", _entries(text)))
    parts = [parse_keys(found, where) for where, found in entries]
    names: dict[str, bytes] = {}
    for part in parts:
        for name, key in part.names.items():
            if names.get(name, key) != key:
                raise KeysError(f"two keys are named {name!r}")
            names[name] = key
    keys = tuple(dict.fromkeys(key for part in parts for key in part.keys))
    return ApiKeys(keys, names)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def exposure(http_host: str | None, grpc_on: bool) -> list[str]:
    """What a Serve instance listens on beyond this machine's loopback, in words (empty:
    loopback only). Serve's gRPC proxy listens on every interface ([::]) whatever the host."""
    beyond = []
    if http_host is not None and http_host.strip() not in LOOPBACK_HOSTS and not http_host.startswith("127."):
        beyond.append(f"HTTP on {http_host}")
    if grpc_on:
        beyond.append("gRPC on [::] (every interface)")
    return beyond
