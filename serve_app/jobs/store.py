"""Job records: one JSON object per job in the Celery result backend's key-value store (Redis,
or files beside the filesystem broker), so any ingress or consumer replica reads the same
state, and it outlives them (and, on a durable Redis, the application).

One module, over 400 lines: every state change of a job (record, lease, cancel flag,
idempotency key) is an atomic step against the same two backends, and they read best beside
each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINAL = ("succeeded", "failed", "canceled")
logger = logging.getLogger("ray.serve")


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


class CorruptRecordError(ValueError):
    """A stored record that is not a job record (cut short, or not JSON)."""

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id}: its stored record is unreadable")
        self.job_id = job_id


class JobStore:
    """Records in a Celery backend (``app.backend``): Redis, or Celery's filesystem backend
    (one file per key, which this class writes itself: the backend truncates a file, then
    writes it, so a reader could see half a record).

    Beside each record, keys that only one side writes: the cancel flag (the ingress), the
    lease of a running job (its consumer), the idempotency key (the ingress, created once), and
    the queued mark (when the job was last sent to the broker). Every change that depends on
    what is stored (a lease taken or renewed, a record written by its lease's holder or over
    the record it read) is one atomic step: a WATCH transaction on Redis, a lock on the
    backend's folder on the filesystem."""

    PREFIX = b"serve-app-job:"
    CANCEL = b"serve-app-cancel:"
    LEASE = b"serve-app-lease:"
    IDEMPOTENCY = b"serve-app-idempotency:"
    QUEUED = b"serve-app-queued:"
    QUARANTINE = b"serve-app-quarantine:"

    def __init__(self, backend):
        self.backend = backend

    # The key-value layer: Celery's backend for plain reads, our own atomic writes.

    def _key(self, job_id: str) -> bytes:
        return self.PREFIX + job_id.encode()

    def _folder(self) -> str | None:
        """The filesystem backend's folder (one file per key); None on Redis."""
        if getattr(self.backend, "client", None) is not None:
            return None
        path = self.backend.path
        return path.decode() if isinstance(path, bytes) else path

    def _path(self, key: bytes) -> str:
        return os.path.join(self._folder(), key.decode())

    def _ttl(self) -> int | None:
        expires = getattr(self.backend, "expires", None)
        return int(expires) if expires else None

    def _read(self, key: bytes) -> bytes | None:
        folder = self._folder()
        if folder is None:
            return self.backend.client.get(key)
        try:
            with open(self._path(key), "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    def _write_file(self, key: bytes, value: bytes) -> None:
        """A whole file or none: written under a temporary name in the same folder, then
        renamed over the key (a rename within a folder is atomic). A record is flushed to
        disk first; a lease, renewed every second, is not (one lost to a power cut only
        sends its job back to the queue)."""
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(value)
                if not key.startswith(self.LEASE):
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _set(self, key: bytes, value: bytes) -> None:
        if self._folder() is None:
            self.backend.client.set(key, value, ex=self._ttl())
        else:
            self._write_file(key, value)

    def _delete(self, key: bytes) -> None:
        if self._folder() is None:
            self.backend.client.delete(key)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))

    def _create(self, key: bytes, value: bytes) -> bool:
        """Write ``key`` only if it does not exist, in one step: Redis ``SET NX``; on the
        filesystem a complete temporary file hard-linked to the key's name (``link`` fails if
        the name exists, so the file appears whole or not at all). True if this call made it."""
        if self._folder() is None:
            return bool(self.backend.client.set(key, value, nx=True, ex=self._ttl()))
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(value)
                file.flush()
                os.fsync(file.fileno())
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _atomically(self, keys: list[bytes], decide):
        """Read ``keys``, let ``decide(current)`` return ``(result, writes)``, apply the writes
        (``{key: value, or None to delete}``) only if none of the keys changed meanwhile, and
        return the result. Redis: redis-py's WATCH/MULTI transaction, retried when a key
        changed; filesystem: an exclusive lock (flock, through filelock) on the folder, which
        the kernel releases if its holder dies, so a killed replica never leaves it held."""
        folder = self._folder()
        if folder is None:
            ttl = self._ttl()

            def transaction(pipe):
                result, writes = decide({key: pipe.get(key) for key in keys})
                pipe.multi()
                for key, value in writes.items():
                    if value is None:
                        pipe.delete(key)
                    else:
                        pipe.set(key, value, ex=ttl)
                return result

            return self.backend.client.transaction(transaction, *keys, value_from_callable=True)
        from filelock import FileLock

        with FileLock(os.path.join(folder, ".serve-app.lock")):
            result, writes = decide({key: self._read(key) for key in keys})
            for key, value in writes.items():
                if value is None:
                    self._delete(key)
                else:
                    self._write_file(key, value)
            return result

    def _keys(self, prefix: bytes) -> list[bytes]:
        """The keys that start with ``prefix``. Listing keys is the one thing the backends'
        key-value API lacks: Redis scans, the filesystem backend lists its folder."""
        folder = self._folder()
        if folder is None:
            return list(self.backend.client.scan_iter(match=prefix + b"*", count=500))
        return [name.encode() for name in os.listdir(folder) if name.encode().startswith(prefix)]

    # Records.

    @staticmethod
    def _encode(record: JobRecord) -> bytes:
        return json.dumps(asdict(record)).encode()

    def _decode(self, job_id: str, raw: bytes | None) -> JobRecord | None:
        if raw is None:
            return None
        try:
            return JobRecord(**json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise CorruptRecordError(job_id) from exc

    def get(self, job_id: str) -> JobRecord | None:
        """The record, None if there is none; :class:`CorruptRecordError` if it is unreadable."""
        return self._decode(job_id, self._read(self._key(job_id)))

    def put(self, record: JobRecord) -> None:
        """Write a record whole, whatever is stored (a new job's)."""
        self._set(self._key(record.id), self._encode(record))

    def delete(self, job_id: str) -> None:
        self._delete(self._key(job_id))

    def replace(self, record: JobRecord, expected: JobRecord, lease: str | None = None) -> bool:
        """Write ``record`` only if the stored one is still ``expected`` (and, with ``lease``,
        only while that lease holds the job): False, and nothing written, otherwise."""
        key, lease_key = self._key(record.id), self.LEASE + record.id.encode()

        def decide(current):
            stored = current[key]
            try:
                unchanged = stored is not None and json.loads(stored) == json.loads(self._encode(expected))
            except ValueError:
                unchanged = False
            if not unchanged or (lease is not None and _holder(current[lease_key]) != lease):
                return False, {}
            return True, {key: self._encode(record)}

        return self._atomically([key, lease_key], decide)

    def put_leased(self, record: JobRecord, lease: str) -> bool:
        """Write ``record`` only while ``lease`` holds its job: a holder whose lease another
        replica took over (it stalled past the lease) writes nothing."""
        key, lease_key = self._key(record.id), self.LEASE + record.id.encode()

        def decide(current):
            if _holder(current[lease_key]) != lease:
                return False, {}
            return True, {key: self._encode(record)}

        return self._atomically([key, lease_key], decide)

    def quarantine(self, job_id: str) -> None:
        """Move an unreadable record aside (``serve-app-quarantine:<id>``, kept for an operator
        to read), with its lease and queued mark, so the sweeps go on without it."""
        key, aside = self._key(job_id), self.QUARANTINE + job_id.encode()
        if self._folder() is None:
            with contextlib.suppress(Exception):  # redis-py: "no such key" if already moved
                self.backend.client.rename(key, aside)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._path(key), self._path(aside))
        self._delete(self.LEASE + job_id.encode())
        self._delete(self.QUEUED + job_id.encode())
        logger.error("job %s: its record is unreadable; moved aside as %s", job_id, aside.decode())

    # Idempotency keys: created once, with the job id they name.

    def _idempotency_key(self, owner: str, key: str) -> bytes:
        return self.IDEMPOTENCY + hashlib.sha256(f"{owner}:{key}".encode()).hexdigest().encode()

    def claim_idempotency(self, owner: str, key: str, body_hash: str, job_id: str) -> str | None:
        """Make ``key`` name ``job_id`` if no submit has used it (one atomic create): None
        then; else the job id an earlier submit with this body made, or "" for another body."""
        name = self._idempotency_key(owner, key)
        if self._create(name, json.dumps({"job": job_id, "body": body_hash}).encode()):
            return None
        raw = self._read(name)
        if raw is None:  # expired or given back meanwhile: try once more
            return self.claim_idempotency(owner, key, body_hash, job_id)
        stored = json.loads(raw)
        return stored["job"] if stored["body"] == body_hash else ""

    def idempotent(self, owner: str, key: str, body_hash: str) -> str | None:
        """The job id an earlier submit with this key and body made, if any ("" for another body)."""
        raw = self._read(self._idempotency_key(owner, key))
        if not raw:
            return None
        stored = json.loads(raw)
        return stored["job"] if stored["body"] == body_hash else ""

    def release_idempotency(self, owner: str, key: str, job_id: str) -> None:
        """Give ``key`` back if it still names ``job_id`` (its submit failed): a retry makes a job."""
        name = self._idempotency_key(owner, key)

        def decide(current):
            raw = current[name]
            ours = raw is not None and json.loads(raw).get("job") == job_id
            return ours, ({name: None} if ours else {})

        self._atomically([name], decide)

    # Cancel flags.

    def request_cancel(self, job_id: str) -> None:
        self._set(self.CANCEL + job_id.encode(), b"1")

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._read(self.CANCEL + job_id.encode()))

    # Leases: "<until> <holder>", taken, renewed and given back only by compare-and-set.

    def claim_lease(self, job_id: str, holder: str, until: float, now: float | None = None,
                    expected: bytes | None = None) -> bool:
        """Take the job's lease for ``holder`` until ``until`` if none is held (none stored,
        or it ran out before ``now``), or, with ``expected``, only if the stored lease is
        still exactly that one. True if ``holder`` has it now."""
        key = self.LEASE + job_id.encode()
        now = time.time() if now is None else now

        def decide(current):
            stored = current[key]
            if expected is not None:
                free = stored == expected
            else:
                free = stored is None or lease_until(stored) < now
            return free, ({key: f"{until} {holder}".encode()} if free else {})

        return self._atomically([key], decide)

    def renew_lease(self, job_id: str, holder: str, until: float) -> bool:
        """Extend ``holder``'s lease; False if another holder took it over."""
        key = self.LEASE + job_id.encode()

        def decide(current):
            mine = _holder(current[key]) == holder
            return mine, ({key: f"{until} {holder}".encode()} if mine else {})

        return self._atomically([key], decide)

    def release_lease(self, job_id: str, holder: str) -> bool:
        """Give the lease back if ``holder`` still has it."""
        key = self.LEASE + job_id.encode()

        def decide(current):
            mine = _holder(current[key]) == holder
            return mine, ({key: None} if mine else {})

        return self._atomically([key], decide)

    def drop_lease(self, job_id: str) -> None:
        """Delete the lease whoever holds it."""
        self._delete(self.LEASE + job_id.encode())

    def _values(self, prefix: bytes) -> dict[str, bytes]:
        """``{job id: value}`` of every key under ``prefix`` still there when read."""
        found = {}
        for key in self._keys(prefix):
            value = self._read(key)
            if value is not None:
                found[key[len(prefix):].decode()] = value
        return found

    def raw_leases(self) -> dict[str, bytes]:
        """Every lease as stored: ``{job id: value}``."""
        return self._values(self.LEASE)

    def leases(self) -> dict[str, float]:
        """Every running job's lease: ``{job id: until}`` (0 for an unreadable one)."""
        return {job_id: lease_until(value) for job_id, value in self.raw_leases().items()}

    # Queued marks: when a queued job was last sent to the broker.

    def mark_queued(self, job_id: str, at: float | None = None) -> None:
        self._set(self.QUEUED + job_id.encode(), str(time.time() if at is None else at).encode())

    def unmark_queued(self, job_id: str) -> None:
        self._delete(self.QUEUED + job_id.encode())

    def queued_marks(self) -> dict[str, float]:
        """``{job id: when it was last sent to the broker}`` of the jobs marked queued."""
        return {job_id: lease_until(value) for job_id, value in self._values(self.QUEUED).items()}

    def expire(self, ttl_s: float, now: float | None = None) -> int:
        """Delete the filesystem backend's keys (records, flags, leases, idempotency keys,
        queued marks, quarantined records) last written more than ``ttl_s`` ago, and Celery's
        own results, as Redis expires each key ``ttl_s`` after its last write; the number of
        our keys deleted."""
        folder = self._folder()
        if folder is None:
            return 0  # Redis expires its keys itself
        cutoff = (time.time() if now is None else now) - ttl_s
        removed = 0
        for prefix in (self.PREFIX, self.CANCEL, self.LEASE, self.IDEMPOTENCY, self.QUEUED,
                       self.QUARANTINE, b".tmp-"):
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


def lease_until(value: bytes | None) -> float:
    """The time a stored lease (or queued mark) runs to; 0 if it is unreadable."""
    try:
        return float(value.split()[0])
    except (AttributeError, IndexError, ValueError):
        return 0.0


def _holder(value: bytes | None) -> str | None:
    """Who holds a stored lease ("<until> <holder>")."""
    if not value:
        return None
    parts = value.decode(errors="replace").split(" ", 1)
    return parts[1] if len(parts) == 2 else None


def new_holder() -> str:
    """A lease holder's name: unique to one claim."""
    return secrets.token_hex(8)
