"""Job records: one JSON object per job in the Celery result backend's key-value store (Redis,
or files beside the filesystem broker), so any ingress or consumer replica reads the same
state, and it outlives them (and, on a durable Redis, the application)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINAL = ("succeeded", "failed", "canceled")


def state_backend(jobs):
    """The Celery result backend holding job records (its key-value store) of a JobsConfig;
    on Redis every key it writes expires after ``jobs.result_ttl_s``."""
    from celery import Celery

    from serve_app.jobs.folders import private_folder

    if jobs.state_url.startswith("file://"):  # Celery's filesystem backend wants its folder
        private_folder(jobs.state_url.removeprefix("file://"))
    app = Celery("serve-app-jobs", backend=jobs.state_url)
    app.conf.result_expires = int(jobs.result_ttl_s)
    return app.backend


def new_job_id() -> str:
    """An unguessable id: 128 random bits."""
    return "job_" + secrets.token_urlsafe(16)


def owner_of(api_key: bytes | None) -> str:
    """Who a job belongs to: a hash of the key that made it ("" with keys off)."""
    return hashlib.sha256(api_key).hexdigest() if api_key else ""


@dataclass
class JobRecord:
    id: str
    operation: str
    owner: str
    request: dict[str, Any]
    priority: str = "normal"
    webhook: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # upload name -> image store id
    status: Status = "queued"
    created: int = field(default_factory=lambda: int(time.time()))
    started: int | None = None
    finished: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    notified: bool = False  # its end was handled: its webhook posted (or given up), or none to post

    def public(self) -> dict[str, Any]:
        """The job object a client sees."""
        return {"id": self.id, "object": "image.job", "operation": self.operation,
                "status": self.status, "priority": self.priority, "created": self.created,
                "started": self.started, "finished": self.finished, "result": self.result,
                "error": self.error}


class JobStore:
    """Records in a Celery backend (``app.backend``): its own ``get``/``set``/``delete``.

    Beside each record, two keys that only one side writes, so neither overwrites the other:
    the cancel flag (the ingress) and the lease of a running job (its consumer, renewed while
    it runs)."""

    PREFIX = b"serve-app-job:"
    CANCEL = b"serve-app-cancel:"
    LEASE = b"serve-app-lease:"
    IDEMPOTENCY = b"serve-app-idempotency:"

    def __init__(self, backend):
        self.backend = backend

    def _key(self, job_id: str) -> bytes:
        return self.PREFIX + job_id.encode()

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.backend.get(self._key(job_id))
        return JobRecord(**json.loads(raw)) if raw else None

    def put(self, record: JobRecord) -> None:
        self.backend.set(self._key(record.id), json.dumps(asdict(record)).encode())

    def idempotent(self, owner: str, key: str, body_hash: str) -> str | None:
        """The job id an earlier submit with this key and body made, if any."""
        raw = self.backend.get(self.IDEMPOTENCY + hashlib.sha256(f"{owner}:{key}".encode()).hexdigest().encode())
        if not raw:
            return None
        stored = json.loads(raw)
        return stored["job"] if stored["body"] == body_hash else ""

    def remember(self, owner: str, key: str, body_hash: str, job_id: str) -> None:
        digest = hashlib.sha256(f"{owner}:{key}".encode()).hexdigest().encode()
        self.backend.set(self.IDEMPOTENCY + digest, json.dumps({"job": job_id, "body": body_hash}).encode())

    def request_cancel(self, job_id: str) -> None:
        self.backend.set(self.CANCEL + job_id.encode(), b"1")

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.backend.get(self.CANCEL + job_id.encode()))

    def renew_lease(self, job_id: str, until: float) -> None:
        self.backend.set(self.LEASE + job_id.encode(), str(until).encode())

    def drop_lease(self, job_id: str) -> None:
        self.backend.delete(self.LEASE + job_id.encode())

    def _folder(self) -> str | None:
        """The filesystem backend's folder (one file per key); None on Redis."""
        if getattr(self.backend, "client", None) is not None:
            return None
        path = self.backend.path
        return path.decode() if isinstance(path, bytes) else path

    def _keys(self, prefix: bytes) -> list[bytes]:
        """The keys that start with ``prefix``. Listing keys is the one thing the backends'
        key-value API lacks: Redis scans, the filesystem backend lists its folder."""
        folder = self._folder()
        if folder is None:
            return list(self.backend.client.scan_iter(match=prefix + b"*", count=500))
        return [name.encode() for name in os.listdir(folder) if name.encode().startswith(prefix)]

    def leases(self) -> dict[str, float]:
        """Every running job's lease: ``{job id: until}``."""
        found = {}
        for key in self._keys(self.LEASE):
            value = self.backend.get(key)
            if value:
                found[key[len(self.LEASE):].decode()] = float(value)
        return found

    def expire(self, ttl_s: float, now: float | None = None) -> int:
        """Delete the filesystem backend's keys (records, flags, leases, idempotency keys)
        last written more than ``ttl_s`` ago, and Celery's own results, as Redis expires
        each key ``ttl_s`` after its last write; the number of our keys deleted."""
        folder = self._folder()
        if folder is None:
            return 0  # Redis expires its keys itself
        cutoff = (time.time() if now is None else now) - ttl_s
        removed = 0
        for prefix in (self.PREFIX, self.CANCEL, self.LEASE, self.IDEMPOTENCY):
            for key in self._keys(prefix):
                path = os.path.join(folder, key.decode())
                try:
                    if os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:  # another replica's sweep took it
                    pass
        self.backend.cleanup()
        return removed
