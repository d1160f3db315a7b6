"""A bounded store for images returned by URL (``response_format: "url"``).

One deployment (one replica) that every ingress replica calls, so an image stored through
one ingress replica is served by any other. Images live ``ttl_s`` seconds; when the total
size passes ``max_bytes`` the oldest go first. With an fsspec backend, a restarted store
replica finds the images already stored there. Backends: ``memory`` (in this replica), or
any fsspec URL (a local directory, ``s3://bucket/prefix`` with s3fs installed, ...).
Ids are 32 random bytes, URL-safe: unguessable.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

_ID_BYTES = 32


@dataclass(frozen=True)
class StoreSpec:
    backend: str = "memory"  # "memory" or an fsspec URL
    ttl_s: float = 3600.0
    max_bytes: int = 1_000_000_000


@dataclass
class _Entry:
    size: int
    content_type: str
    expires: float
    data: bytes | None = None  # memory backend only


def new_id() -> str:
    return secrets.token_urlsafe(_ID_BYTES)


def valid_id(image_id: str) -> bool:
    """Ids are what new_id makes; anything else (paths, dots) is never looked up."""
    return len(image_id) == 43 and all(c.isalnum() or c in "-_" for c in image_id)


class ImageStore:
    """The store's logic, independent of Ray (``clock`` is injectable for tests)."""

    def __init__(self, spec: StoreSpec, clock: Callable[[], float] = time.time):
        self.spec = spec
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._fs = None
        if spec.backend != "memory":
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(spec.backend)
            self._fs.makedirs(self._root, exist_ok=True)
            self._recover()

    def _recover(self) -> None:
        """Rebuild the index from the backend, so that images stored before this replica
        (re)started stay downloadable until they expire. Each image has a ``<id>.json``
        beside it with its content type and expiry; a file without its partner (a write cut
        short) is removed."""
        found: list[tuple[float, str, _Entry]] = []
        names = {path.rsplit("/", 1)[-1]: info for path, info in self._fs.find(self._root, detail=True).items()}
        for name, info in names.items():
            image_id = name.removesuffix(".json")
            partner = image_id if name.endswith(".json") else f"{name}.json"
            if not valid_id(image_id) or partner not in names:
                self._fs.rm(info["name"])
                continue
            if not name.endswith(".json"):
                continue
            try:
                with self._fs.open(info["name"], "r") as handle:
                    meta = json.load(handle)
                entry = _Entry(int(names[image_id]["size"]), str(meta["content_type"]),
                               float(meta["expires"]))
            except (ValueError, KeyError, TypeError):  # an unreadable index file
                self._fs.rm([info["name"], names[image_id]["name"]])
                continue
            found.append((entry.expires, image_id, entry))
        for _, image_id, entry in sorted(found):  # oldest first, as they were stored
            self._entries[image_id] = entry
            self._bytes += entry.size
        self._expire()
        self._evict()

    def _path(self, image_id: str) -> str:
        return f"{self._root.rstrip('/')}/{image_id}"

    def put(self, data: bytes, content_type: str) -> str:
        """Store ``data``; returns its id."""
        self._expire()
        image_id = new_id()
        entry = _Entry(len(data), content_type, self.clock() + self.spec.ttl_s)
        if self._fs is None:
            entry.data = data
        else:
            with self._fs.open(self._path(image_id), "wb") as handle:
                handle.write(data)
            with self._fs.open(self._path(image_id) + ".json", "w") as handle:
                json.dump({"content_type": content_type, "expires": entry.expires}, handle)
        self._entries[image_id] = entry
        self._bytes += entry.size
        self._evict()
        return image_id

    def _evict(self) -> None:
        """Drop the oldest images while the total is over ``max_bytes`` (the newest stays)."""
        while self._bytes > self.spec.max_bytes and len(self._entries) > 1:
            self._drop(next(iter(self._entries)))

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        """(bytes, content type), or None when unknown or expired."""
        self._expire()
        entry = self._entries.get(image_id) if valid_id(image_id) else None
        if entry is None:
            return None
        if entry.data is not None:
            return entry.data, entry.content_type
        with self._fs.open(self._path(image_id), "rb") as handle:
            return handle.read(), entry.content_type

    def _expire(self) -> None:
        now = self.clock()
        for image_id in [i for i, e in self._entries.items() if e.expires <= now]:
            self._drop(image_id)

    def _drop(self, image_id: str) -> None:
        entry = self._entries.pop(image_id)
        self._bytes -= entry.size
        if self._fs is not None:
            for path in (self._path(image_id), self._path(image_id) + ".json"):
                if self._fs.exists(path):
                    self._fs.rm(path)

    @property
    def total_bytes(self) -> int:
        return self._bytes


class ImageStoreDeployment:
    """The Serve deployment around :class:`ImageStore` (keep it at one replica)."""

    def __init__(self, spec: StoreSpec):
        self.store = ImageStore(spec)

    async def put(self, data: bytes, content_type: str) -> str:
        return self.store.put(data, content_type)

    async def get(self, image_id: str) -> tuple[bytes, str] | None:
        return self.store.get(image_id)
