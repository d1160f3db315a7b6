"""The jobs layer's atomic steps (serve_app/jobs/store.py, runner.py, fronts/jobs.py) on both
backends: Celery's filesystem backend in a temporary folder, and a real Redis (its own
database of SERVE_APP_TEST_REDIS_URL's server): one job per Idempotency-Key under concurrent
submits, no record left queued without a message, whole records, corrupt records moved
aside, and leases that one replica at a time holds."""

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_app.config import load_app_config
from serve_app.jobs.runner import LEASE_S, JobRunner, recover_lost, redispatch_queued
from serve_app.jobs.store import CorruptRecordError, JobRecord, JobStore, new_job_id
from serve_app.protocol.keys import owner_of

# A database of the test Redis that no other test uses: its keys are flushed per test (so one
# run of this file at a time against one server).
REDIS_DB = 13


@pytest.fixture(params=["filesystem", "redis"])
def store(request, tmp_path):
    from celery import Celery

    if request.param == "filesystem":
        yield JobStore(Celery("t", backend=f"file://{tmp_path}").backend)
        return
    url = os.environ.get("SERVE_APP_TEST_REDIS_URL")
    if not url:
        pytest.skip("no Redis: .ci/run starts one and sets SERVE_APP_TEST_REDIS_URL")
    url = f"{url.rsplit('/', 1)[0]}/{REDIS_DB}"
    app = Celery("t", backend=url)
    app.conf.result_expires = 3600
    app.backend.client.flushdb()
    yield JobStore(app.backend)
    app.backend.client.flushdb()


def record(**fields):
    fields.setdefault("request", {"task": "generate", "prompt": "x"})
    return JobRecord(id=new_job_id(), operation="generations", owner=owner_of(b"sk-one"), **fields)


def at_once(count, call):
    """``call(i)`` from ``count`` threads released together; their results."""
    barrier = threading.Barrier(count)

    def run(i):
        barrier.wait()
        return call(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


# --- idempotency ----------------------------------------------------------------------------


def test_concurrent_claims_of_one_idempotency_key_make_one_job(store):
    results = at_once(8, lambda i: store.claim_idempotency("owner", "key-1", "body", f"job_{i}"))
    made = [i for i, result in enumerate(results) if result is None]
    assert len(made) == 1, results
    assert all(result == f"job_{made[0]}" for result in results if result is not None)
    assert store.claim_idempotency("owner", "key-1", "other body", "job_x") == ""  # a conflict
    store.release_idempotency("owner", "key-1", "job_x")  # not its job: kept
    assert store.idempotent("owner", "key-1", "body") == f"job_{made[0]}"
    store.release_idempotency("owner", "key-1", f"job_{made[0]}")
    assert store.claim_idempotency("owner", "key-1", "body", "job_y") is None


class _Jobs:
    """What the ingress holds for the jobs routes (serve_app/jobs/client.py), with a broker
    that records what it is sent, or fails."""

    def __init__(self, store, fail=False):
        from serve_app.jobs.webhooks import WebhookPolicy

        self.store, self.policy, self.signs_webhooks = store, WebhookPolicy(), False
        self.sent, self.fail = [], fail

    def enqueue(self, record):
        if self.fail:
            raise ConnectionError("the broker is down")
        self.sent.append(record.id)


def jobs_api(tiny_args, jobs):
    """The ingress's app over the tiny profile's planning (fake model handles), with ``jobs``
    as its jobs client: what the constructor puts on its state, a test's own."""
    from serve_app.fronts.ingress import build_api
    from serve_app.service.images import ImagesService
    from tests.unit.fakes import fake_handles

    config = load_app_config(tiny_args)
    app = build_api()
    app.state.service = ImagesService(config, fake_handles(config))
    app.state.jobs = jobs
    return app


BODY = {"operation": "generations", "input": {"prompt": "a fox", "size": "256x256", "seed": 5,
                                              "num_inference_steps": 4}}


def test_concurrent_submits_with_one_key_make_one_job_over_http(tiny_args, store):
    from fastapi.testclient import TestClient

    jobs = _Jobs(store)
    app = jobs_api(tiny_args, jobs)

    def submit(i):
        with TestClient(app) as client:
            return client.post("/v1/images/jobs", json=BODY, headers={"Idempotency-Key": "k-1"})

    answers = at_once(6, submit)
    assert [a.status_code for a in answers] == [202] * 6, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1 and len(jobs.sent) == 1
    assert store.get(jobs.sent[0]).status == "queued"


def test_a_submit_the_broker_refuses_leaves_no_job_and_frees_its_key(tiny_args, store):
    from fastapi.testclient import TestClient

    jobs = _Jobs(store, fail=True)
    with TestClient(jobs_api(tiny_args, jobs)) as client:
        refused = client.post("/v1/images/jobs", json=BODY, headers={"Idempotency-Key": "k-2"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "broker_unavailable"
        assert refused.headers["Retry-After"]
        assert store._keys(store.PREFIX) == [] and store.queued_marks() == {}
        jobs.fail = False
        again = client.post("/v1/images/jobs", json=BODY, headers={"Idempotency-Key": "k-2"})
    assert again.status_code == 202 and jobs.sent == [again.json()["id"]]


def test_a_queued_job_whose_message_was_lost_is_sent_again(store):
    """A record written, its message never sent (the ingress died between) or taken by a
    consumer that died: the sweep sends it again once it is REDISPATCH_S old, and not while
    its message waits in the broker."""
    lost, waiting, started = record(), record(), record(status="running")
    canceled = record(status="canceled", webhook="http://127.0.0.1/hook")  # its end still to post
    for job in (lost, waiting, started, canceled):
        store.put(job)
        store.mark_queued(job.id, at=1000.0)
    sent = []
    in_broker = lambda: {waiting.id}  # noqa: E731
    assert asyncio.run(redispatch_queued(store, sent.append, in_broker, now=1060.0)) == []
    assert sorted(asyncio.run(redispatch_queued(store, sent.append, in_broker, now=1200.0))) == \
        sorted([lost.id, canceled.id])
    assert sorted(r.id for r in sent) == sorted([lost.id, canceled.id])
    assert set(store.queued_marks()) == {lost.id, waiting.id, canceled.id}  # not the running one's
    assert asyncio.run(redispatch_queued(store, sent.append, in_broker, now=1250.0)) == []


# --- whole records, corrupt records ---------------------------------------------------------


def test_a_poll_racing_writes_reads_a_whole_record(store):
    job = record(request={"task": "generate", "prompt": "x" * 200_000})
    store.put(job)
    stop = threading.Event()
    seen = []

    def write():
        while not stop.is_set():
            store.put(job)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(200):
            seen.append(store.get(job.id))
    finally:
        stop.set()
        writer.join()
    assert all(found == job for found in seen)


def test_a_half_written_record_is_quarantined_and_the_sweeps_go_on(tiny_args, store, tmp_path):
    """A consumer killed mid-write (Celery's own write truncates, then writes) left half a
    record with an expired lease: the sweep moves it aside and takes over the other jobs;
    expiry and the queue depths go on."""
    from serve_app.jobs.broker import waiting_job_ids
    from serve_app.jobs.metrics import queue_depths

    broken, lost = record(status="running"), record(status="running")
    for job in (broken, lost):
        store.put(job)
        store.claim_lease(job.id, "dead-replica", time.time() - 1, now=0)
    half = store._encode(broken)[:40]
    if store._folder() is None:
        store.backend.client.set(store._key(broken.id), half)
    else:
        with open(store._path(store._key(broken.id)), "wb") as file:  # as Celery's set() leaves it
            file.write(half)
    with pytest.raises(CorruptRecordError):
        store.get(broken.id)
    sent = []
    assert asyncio.run(recover_lost(store, sent.append)) == [lost.id]
    assert store.get(broken.id) is None and set(store.leases()) == set()
    assert store._read(store.QUARANTINE + broken.id.encode()) == half  # kept for the operator
    assert store.get(lost.id).status == "queued" and [r.id for r in sent] == [lost.id]
    store.expire(ttl_s=86400)
    jobs = load_app_config({**tiny_args, "jobs": {**tiny_args["jobs"], "data_folder": str(tmp_path / "d")}}).jobs
    assert queue_depths(jobs) == {"high": 0, "normal": 0, "low": 0} and waiting_job_ids(jobs) == set()


# --- leases ----------------------------------------------------------------------------------


def test_a_lease_is_held_by_one_claimer_at_a_time(store):
    claims = at_once(8, lambda i: store.claim_lease("job_a", f"r{i}", time.time() + 60))
    assert claims.count(True) == 1
    holder = f"r{claims.index(True)}"
    other = "r9"
    assert not store.renew_lease("job_a", other, time.time() + 60)
    assert not store.release_lease("job_a", other)
    assert store.renew_lease("job_a", holder, time.time() + 60)
    assert store.release_lease("job_a", holder) and store.leases() == {}


def test_two_sweepers_racing_over_an_expired_lease_requeue_the_job_once(store):
    job = record(status="running")
    store.put(job)
    store.claim_lease(job.id, "dead-replica", time.time() - 1, now=0)
    sent = []
    lock = threading.Lock()

    def enqueue(found):
        with lock:
            sent.append(found.id)

    taken = at_once(4, lambda i: asyncio.run(recover_lost(store, enqueue)))
    assert sorted(sum(taken, [])) == [job.id] and sent == [job.id]
    assert store.get(job.id).status == "queued" and store.leases() == {}


def runner_for(tiny_args, store, service):
    return JobRunner(load_app_config(tiny_args), service, store, images_store=None)


def runners(tiny_args, store, service, count):
    """``count`` runners, as ``count`` consumer replicas (configs loaded one at a time: Ray's
    validation of a config is not safe across threads)."""
    return [runner_for(tiny_args, store, service) for _ in range(count)]


class _Done:
    def model_dump_json(self, **kwargs):
        return '{"created": 1, "data": []}'


class _CountingService:
    """A fake images service (unit tests only) whose runs take ``seconds``; counts them."""

    def __init__(self, seconds=0.0):
        self.seconds, self.runs = seconds, 0

    async def plan(self, request, image=None, mask=None):
        return request

    async def execute(self, plan, base_url, owner=""):
        self.runs += 1
        await asyncio.sleep(self.seconds)
        return _Done()


def test_duplicate_deliveries_run_a_job_once(tiny_args, store):
    service = _CountingService(seconds=2.0)
    job = record()
    store.put(job)
    replicas = runners(tiny_args, store, service, 4)
    statuses = at_once(4, lambda i: asyncio.run(replicas[i].handle_delivery(job.id)))
    # One runs it; the others find its lease held ("running") or, if late, the job ended.
    assert service.runs == 1 and statuses.count("succeeded") >= 1, statuses
    assert set(statuses) <= {"running", "succeeded"}, statuses
    assert asyncio.run(runner_for(tiny_args, store, service).handle_delivery(job.id)) == "succeeded"
    assert service.runs == 1 and store.get(job.id).attempts == 1 and store.leases() == {}


def test_a_stalled_holder_whose_lease_was_taken_over_writes_nothing(tiny_args, store):
    """A run stalls past its lease; a sweep takes the job over and sends it back, and another
    replica starts it. The stalled run then neither completes nor re-queues it."""
    job = record()
    store.put(job)
    service = _CountingService(seconds=0.0)
    runner = runner_for(tiny_args, store, service)

    async def stalled_then_taken_over():
        lease = "stalled-replica"
        assert store.claim_lease(job.id, lease, time.time() + LEASE_S)
        running = store.get(job.id)
        running.status, running.attempts = "running", 1
        assert store.put_leased(running, lease)
        # The store stalls past the lease: a sweep takes the job over, a new run starts it.
        sent = []
        assert await recover_lost(store, sent.append, now=time.time() + LEASE_S + 1) == [job.id]
        new_holder = "new-replica"
        assert store.claim_lease(job.id, new_holder, time.time() + LEASE_S)
        taken = store.get(job.id)
        taken.status, taken.attempts = "running", 2
        assert store.put_leased(taken, new_holder)
        # The stalled run comes back: its end and its re-queue are refused.
        assert await runner._finish(store.get(job.id), "succeeded", lease) == "lost"
        assert await runner._server_fault(store.get(job.id), lease, _fault(), retries=0) == "lost"
        assert not store.renew_lease(job.id, lease, time.time() + LEASE_S)
        return sent

    sent = asyncio.run(stalled_then_taken_over())
    assert len(sent) == 1
    now = store.get(job.id)
    assert (now.status, now.attempts) == ("running", 2) and store.leases().keys() == {job.id}


def _fault():
    from serve_app.protocol.errors import ServerFaultAPIError

    return ServerFaultAPIError("the model replica was lost")


def test_a_cancel_while_queued_is_not_lost_to_a_run_starting(tiny_args, store):
    """The ingress cancels a queued job by compare-and-set over the record it read: a consumer
    that started the job first keeps it (and the cancel flag stops it)."""
    from dataclasses import replace

    job = record()
    store.put(job)
    read_by_ingress = store.get(job.id)
    assert store.claim_lease(job.id, "consumer", time.time() + LEASE_S)
    started = replace(read_by_ingress, status="running", attempts=1)
    assert store.replace(started, read_by_ingress, "consumer")
    canceled = replace(read_by_ingress, status="canceled", finished=1)
    assert not store.replace(canceled, read_by_ingress)
    assert store.get(job.id).status == "running"


@pytest.mark.parametrize("broker", ["filesystem", "redis"])
def test_the_sweep_sees_which_jobs_wait_in_the_broker(tiny_args, tmp_path, broker):
    """``waiting_job_ids`` reads the ids of the messages Celery sent to the priority queues."""
    from celery import Celery

    from serve_app.jobs.broker import _folders, priority_queue, waiting_job_ids

    jobs_args = {**tiny_args["jobs"], "data_folder": str(tmp_path)}
    if broker == "redis":
        url = os.environ.get("SERVE_APP_TEST_REDIS_URL")
        if not url:
            pytest.skip("no Redis: .ci/run starts one and sets SERVE_APP_TEST_REDIS_URL")
        jobs_args["broker_url"] = f"{url.rsplit('/', 1)[0]}/{REDIS_DB}"
    jobs = load_app_config({**tiny_args, "jobs": jobs_args}).jobs
    app = Celery("sender", broker=jobs.broker)
    if broker == "filesystem":
        app.conf.broker_transport = "serve_app.jobs.broker:PriorityFilesystemTransport"
        app.conf.broker_transport_options = _folders(jobs)
    else:
        import redis

        redis.Redis.from_url(jobs.broker).flushdb()
    try:
        for job_id, priority in (("job_a", "high"), ("job_b", "low")):
            app.send_task("serve_app.run_job", args=[job_id], task_id=job_id,
                          queue=priority_queue(jobs.queue, priority))
        assert waiting_job_ids(jobs) == {"job_a", "job_b"}
    finally:
        if broker == "redis":
            redis.Redis.from_url(jobs.broker).flushdb()
