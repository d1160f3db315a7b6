"""A bounded store for images returned by URL (``response_format: "url"``) and for the uploads
of queued async jobs.

One deployment (one replica) that every ingress replica calls, so an image stored through
one ingress replica is served by any other. Backends: ``memory`` (in this replica), or any
fsspec URL (a local directory, ``s3://bucket/prefix`` with s3fs installed, ...); with an
fsspec backend a restarted store replica finds what was stored there. Ids are 32 random
bytes, URL-safe: unguessable.

Two kinds of entry, each in a pool of its own with its own time-to-live and caps:

- ``image``: a URL response's image. When its owner (the API key that asked for it) passes
  its share (``per_key``), or the pool its caps, the owner's own oldest images go first; the
  images of another key never do: a put that only room taken by others could make is
  refused (``StoreRefused("full")``).
- ``input``: a queued job's upload. Never evicted: it expires with its TTL (at least the
  jobs' own) or is deleted when its job ends; a put past a cap is refused.

Every operation costs O(log n): expiry pops a heap ordered by expiry time, eviction takes
the owner's oldest image from an insertion-ordered dict.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

_ID_BYTES = 32
IMAGE, INPUT = "image", "input"
KINDS = (IMAGE, INPUT)


@dataclass(frozen=True)
class Limits:
    """At most ``max_bytes`` of payload in at most ``max_entries`` entries."""

    max_bytes: int
    max_entries: int


@dataclass(frozen=True)
class PoolSpec:
    """One kind of entry: how long each lives, the caps of the pool and of one key's share
    (the anonymous owner "", with API keys off, has the whole pool: no other key to spare)."""

    ttl_s: float
    total: Limits
    per_key: Limits


@dataclass(frozen=True)
class StoreSpec:
    """The store's settings (built from the app config's ``image_store``)."""

    backend: str  # "memory" or an fsspec URL
    images: PoolSpec
    inputs: PoolSpec

    def pool(self, kind: str) -> PoolSpec:
        return self.images if kind == IMAGE else self.inputs


class StoreRefused(Exception):
    """A put the store will not take. ``reason``: ``too_large`` (one entry past a cap),
    ``key_quota`` (the owner's share is full of what cannot be evicted) or ``full`` (the pool
    is full of other keys' data, or of job uploads)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message

    def __reduce__(self):  # keep both when the error crosses a process boundary
        return (type(self), (self.reason, self.message))


@dataclass
class _Entry:
    size: int
    content_type: str
    expires: float
    owner: str = ""
    kind: str = IMAGE
    data: bytes | None = None  # memory backend only
    written: bool = True  # False while its files are being written (not yet evictable)


@dataclass
class _Usage:
    bytes: int = 0
    entries: int = 0

    def add(self, size: int, sign: int = 1) -> None:
        self.bytes += sign * size
        self.entries += sign


@dataclass
class _Share:
    """One owner's entries of one kind: what it holds, and its evictable images oldest first."""

    held: _Usage = field(default_factory=_Usage)
    evictable: _Usage = field(default_factory=_Usage)
    order: OrderedDict = field(default_factory=OrderedDict)  # id -> None, oldest first


def new_id() -> str:
    return secrets.token_urlsafe(_ID_BYTES)


def valid_id(image_id: str) -> bool:
    """Ids are what new_id makes; anything else (paths, dots) is never looked up."""
    return len(image_id) == 43 and all(c.isalnum() or c in "-_" for c in image_id)


class ImageStore:
    """The store's logic, independent of Ray (``clock`` is injectable for tests).

    Thread-safe: the index is changed under a lock, and the backend's I/O runs outside it, so
    the deployment runs a blocking backend's calls in threads."""

    def __init__(self, spec: StoreSpec, clock: Callable[[], float] = time.time):
        self.spec = spec
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._expiry: list[tuple[float, str]] = []  # a heap; dropped entries stay until popped
        self._shares: dict[tuple[str, str], _Share] = {}  # (kind, owner) -> share
        self._totals = {kind: _Usage() for kind in KINDS}
        self._fs = None
        if spec.backend != "memory":
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(spec.backend)
            self._fs.makedirs(self._root, exist_ok=True)
            self._recover()

    @property
    def blocking(self) -> bool:
        """Whether calls do blocking I/O (an fsspec backend): run them in a thread."""
        return self._fs is not None

    # --- the index (callers hold the lock) ------------------------------------------------

    def _share(self, kind: str, owner: str) -> _Share:
        share = self._shares.get((kind, owner))
        if share is None:
            share = self._shares[(kind, owner)] = _Share()
        return share

    def _add(self, image_id: str, entry: _Entry) -> None:
        self._entries[image_id] = entry
        heapq.heappush(self._expiry, (entry.expires, image_id))
        self._share(entry.kind, entry.owner).held.add(entry.size)
        self._totals[entry.kind].add(entry.size)
        if entry.written:
            self._mark_written(image_id, entry)

    def _mark_written(self, image_id: str, entry: _Entry) -> None:
        entry.written = True
        if entry.kind == IMAGE:  # job uploads are never evicted
            share = self._share(entry.kind, entry.owner)
            share.order[image_id] = None
            share.evictable.add(entry.size)

    def _drop(self, image_id: str) -> str | None:
        """Forget an entry; returns its id when the backend holds files to remove."""
        entry = self._entries.pop(image_id, None)
        if entry is None:
            return None
        share = self._shares[(entry.kind, entry.owner)]
        share.held.add(entry.size, -1)
        self._totals[entry.kind].add(entry.size, -1)
        if image_id in share.order:
            del share.order[image_id]
            share.evictable.add(entry.size, -1)
        if share.held.entries == 0:
            del self._shares[(entry.kind, entry.owner)]
        return image_id if self._fs is not None else None

    def _expire(self) -> list[str]:
        """Drop what has expired: the heap's head only, O(log n) each."""
        now, dropped = self.clock(), []
        while self._expiry and self._expiry[0][0] <= now:
            expires, image_id = heapq.heappop(self._expiry)
            entry = self._entries.get(image_id)
            if entry is not None and entry.expires == expires:
                dropped.append(self._drop(image_id))
        # Entries evicted or deleted early leave their heap item behind: rebuild the heap when
        # those outnumber the live ones (O(n), once per n drops).
        if len(self._expiry) > 2 * len(self._entries) + 1024:
            self._expiry = [(e.expires, i) for i, e in self._entries.items()]
            heapq.heapify(self._expiry)
        return [image_id for image_id in dropped if image_id]

    def _make_room(self, sizes: list[int], owner: str, kind: str) -> list[str]:
        """Evict the owner's own oldest images until ``sizes`` fit both its share and the
        pool; raises StoreRefused, evicting nothing, when they cannot."""
        pool = self.spec.pool(kind)
        share_limits = pool.per_key if owner else pool.total
        what = "job uploads" if kind == INPUT else "images"
        for size in sizes:
            for limits, whose in ((pool.total, "all keys"), (share_limits, "one key")):
                if size > limits.max_bytes:
                    raise StoreRefused("too_large", f"an entry of {size} bytes is larger than the "
                                       f"image store keeps of {what} for {whose} ({limits.max_bytes} bytes)")
        share = self._shares.get((kind, owner)) or _Share()
        total = self._totals[kind]
        new_bytes, new_entries = sum(sizes), len(sizes)
        own = (share.held.bytes + new_bytes - share_limits.max_bytes,
               share.held.entries + new_entries - share_limits.max_entries)
        pooled = (total.bytes + new_bytes - pool.total.max_bytes,
                  total.entries + new_entries - pool.total.max_entries)
        free = (share.evictable.bytes, share.evictable.entries)
        if own[0] > free[0] or own[1] > free[1]:
            raise StoreRefused("key_quota", f"this API key's {what} fill its share of the image "
                               f"store ({share.held.entries} entries, {share.held.bytes} bytes; "
                               f"at most {share_limits.max_entries} entries and "
                               f"{share_limits.max_bytes} bytes)")
        if pooled[0] > free[0] or pooled[1] > free[1]:
            raise StoreRefused("full", f"the image store is full of other keys' {what} "
                               f"({total.entries} entries, {total.bytes} bytes; at most "
                               f"{pool.total.max_entries} entries and {pool.total.max_bytes} bytes)")
        need_bytes, need_entries = max(own[0], pooled[0], 0), max(own[1], pooled[1], 0)
        evicted = []
        while need_bytes > 0 or need_entries > 0:
            oldest = next(iter(share.order))
            need_bytes -= self._entries[oldest].size
            need_entries -= 1
            evicted.append(self._drop(oldest))
        return [image_id for image_id in evicted if image_id]

    # --- the operations --------------------------------------------------------------------

    def put(self, data: bytes, content_type: str, owner: str = "", kind: str = IMAGE) -> str:
        """Store ``data`` for ``owner``; returns its id."""
        return self.put_many([(data, content_type)], owner, kind)[0]

    def put_many(self, items: list[tuple[bytes, str]], owner: str = "", kind: str = IMAGE) -> list[str]:
        """Store every ``(data, content type)`` of ``items`` for ``owner``, or none of them
        (StoreRefused); returns their ids."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        with self._lock:
            gone = self._expire()
            gone += self._make_room([len(data) for data, _ in items], owner, kind)
            expires = self.clock() + self.spec.pool(kind).ttl_s
            entries = {}
            for data, content_type in items:
                image_id = new_id()
                entries[image_id] = _Entry(len(data), content_type, expires, owner, kind,
                                           data=data if self._fs is None else None,
                                           written=self._fs is None)
                self._add(image_id, entries[image_id])
        self._remove_files(gone)
        if self._fs is not None:
            try:
                for (image_id, entry), (data, _) in zip(entries.items(), items):
                    self._write(image_id, entry, data)
            except BaseException:
                with self._lock:
                    dropped = [self._drop(image_id) for image_id in entries]
                self._remove_files([image_id for image_id in dropped if image_id])
                raise
            with self._lock:
                for image_id, entry in entries.items():
                    if image_id in self._entries:
                        self._mark_written(image_id, entry)
        return list(entries)

    def get(self, image_id: str, kind: str = IMAGE) -> tuple[bytes, str] | None:
        """(bytes, content type) of an entry of ``kind``, or None when unknown or expired."""
        if not valid_id(image_id):
            return None
        with self._lock:
            gone = self._expire()
            entry = self._entries.get(image_id)
            if entry is not None and (entry.kind != kind or not entry.written):
                entry = None
        self._remove_files(gone)
        if entry is None:
            return None
        if entry.data is not None:
            return entry.data, entry.content_type
        try:
            with self._fs.open(self._path(image_id), "rb") as handle:
                return handle.read(), entry.content_type
        except FileNotFoundError:  # evicted or expired while being read
            return None

    def delete(self, image_ids: list[str]) -> int:
        """Remove entries now (a job's uploads when it ends); returns how many were held."""
        with self._lock:
            held = [image_id for image_id in image_ids if image_id in self._entries]
            gone = [self._drop(image_id) for image_id in held]
        self._remove_files([image_id for image_id in gone if image_id])
        return len(held)

    def usage(self, kind: str = IMAGE, owner: str | None = None) -> tuple[int, int]:
        """(bytes, entries) held of ``kind``: by ``owner``, or by everyone."""
        with self._lock:
            if owner is None:
                total = self._totals[kind]
            else:
                total = self._shares.get((kind, owner), _Share()).held
            return total.bytes, total.entries

    @property
    def total_bytes(self) -> int:
        return sum(usage.bytes for usage in self._totals.values())

    # --- the backend's files -----------------------------------------------------------------

    def _path(self, image_id: str) -> str:
        return f"{self._root.rstrip('/')}/{image_id}"

    def _write(self, image_id: str, entry: _Entry, data: bytes) -> None:
        with self._fs.open(self._path(image_id), "wb") as handle:
            handle.write(data)
        with self._fs.open(self._path(image_id) + ".json", "w") as handle:
            json.dump({"content_type": entry.content_type, "expires": entry.expires,
                       "owner": entry.owner, "kind": entry.kind}, handle)

    def _remove_files(self, image_ids: list[str]) -> None:
        paths = [p for image_id in image_ids for p in (self._path(image_id), self._path(image_id) + ".json")]
        for path in paths:
            try:
                self._fs.rm(path)
            except FileNotFoundError:
                pass

    def _recover(self) -> None:
        """Rebuild the index from the backend, so that what was stored before this replica
        (re)started stays there until it expires. Each entry has a ``<id>.json`` beside it
        with its content type, expiry, owner and kind; a file without its partner (a write
        cut short) is removed."""
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
                kind = str(meta.get("kind", IMAGE))
                if kind not in KINDS:
                    raise ValueError(kind)
                entry = _Entry(int(names[image_id]["size"]), str(meta["content_type"]),
                               float(meta["expires"]), str(meta.get("owner", "")), kind)
            except (ValueError, KeyError, TypeError, AttributeError):  # an unreadable index file
                self._fs.rm([info["name"], names[image_id]["name"]])
                continue
            found.append((entry.expires, image_id, entry))
        with self._lock:
            for _, image_id, entry in sorted(found):  # oldest first, as they were stored
                self._add(image_id, entry)
            gone = self._expire()
        self._remove_files(gone)


class ImageStoreDeployment:
    """The Serve deployment around :class:`ImageStore` (keep it at one replica). A blocking
    backend's calls run in threads, never on the replica's event loop."""

    def __init__(self, spec: StoreSpec):
        self.store = ImageStore(spec)

    async def _call(self, method, *args):
        if self.store.blocking:
            return await asyncio.to_thread(method, *args)
        return method(*args)  # memory: no I/O, O(log n)

    async def put(self, data: bytes, content_type: str, owner: str = "", kind: str = IMAGE) -> str:
        return await self._call(self.store.put, data, content_type, owner, kind)

    async def put_many(self, items: list[tuple[bytes, str]], owner: str = "", kind: str = IMAGE) -> list[str]:
        return await self._call(self.store.put_many, items, owner, kind)

    async def get(self, image_id: str, kind: str = IMAGE) -> tuple[bytes, str] | None:
        return await self._call(self.store.get, image_id, kind)

    async def delete(self, image_ids: list[str]) -> int:
        return await self._call(self.store.delete, image_ids)
