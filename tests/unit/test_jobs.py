"""Job records, leases and the recovery of lost jobs (serve_app/jobs), on Celery's file
backend in a temporary folder; the jobs config."""

import asyncio
import time

import pytest

from serve_app.config import load_app_config
from serve_app.jobs.runner import JobRunner, recover_lost, request_from
from serve_app.jobs.store import JobRecord, JobStore, new_job_id
from serve_app.protocol.keys import owner_of
from serve_app.protocol.request import ImageRequest


@pytest.fixture
def store(tmp_path):
    from celery import Celery

    return JobStore(Celery("t", backend=f"file://{tmp_path}").backend)


def record(**fields):
    return JobRecord(id=new_job_id(), operation="generations", owner=owner_of(b"sk-one"),
                     request={"task": "generate", "prompt": "x"}, **fields)


def test_ids_are_unguessable_and_owners_are_key_hashes():
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) >= 26 for i in ids)
    assert owner_of(b"sk-one") != owner_of(b"sk-two") and owner_of(None) == ""
    assert "sk-one" not in owner_of(b"sk-one")


def test_records_round_trip_and_the_public_object_hides_the_owner(store):
    job = record(webhook="http://127.0.0.1/hook")
    store.put(job)
    back = store.get(job.id)
    assert back == job and store.get("job_missing") is None
    public = back.public()
    assert public["object"] == "image.job" and "owner" not in public and "request" not in public


def test_idempotency_keys_are_per_owner_and_body(store):
    assert store.claim_idempotency("owner-a", "k", "body-1", "job_1") is None  # made: it names job_1
    assert store.claim_idempotency("owner-a", "k", "body-1", "job_2") == "job_1"
    assert store.idempotent("owner-a", "k", "body-1") == "job_1"
    assert store.idempotent("owner-a", "k", "body-2") == ""  # same key, other body: a conflict
    assert store.idempotent("owner-b", "k", "body-1") is None  # another key's: unrelated


def test_cancel_flags_and_leases_live_beside_the_record(store):
    store.request_cancel("job_a")
    assert store.cancel_requested("job_a") and not store.cancel_requested("job_b")
    assert store.claim_lease("job_a", "one", 10.0, now=0) and store.claim_lease("job_b", "two", 20.0, now=0)
    assert store.leases() == {"job_a": 10.0, "job_b": 20.0}
    assert store.release_lease("job_a", "one")
    assert store.leases() == {"job_b": 20.0}


def test_the_filesystem_store_expires_keys_not_written_for_the_ttl(store, tmp_path):
    import os

    old, fresh = record(), record()
    for job in (old, fresh):
        store.put(job)
        store.request_cancel(job.id)
    store.claim_idempotency(old.owner, "key-1", "body", old.id)
    store.backend.set(b"celery-task-meta-" + old.id.encode(), b"{}")  # Celery's own result
    two_days_ago = time.time() - 2 * 86400
    for name in os.listdir(tmp_path):
        if old.id in name or name.startswith("serve-app-idempotency:"):
            os.utime(tmp_path / name, (two_days_ago, two_days_ago))
    assert store.expire(ttl_s=86400) == 3  # the record, its cancel flag, the idempotency key
    assert store.get(old.id) is None and not store.cancel_requested(old.id)
    assert store.idempotent(old.owner, "key-1", "body") is None
    assert store.backend.get(b"celery-task-meta-" + old.id.encode()) is None
    assert store.get(fresh.id) == fresh and store.cancel_requested(fresh.id)


def test_a_running_job_whose_lease_ran_out_goes_back_to_the_broker(store):
    lost, alive, done = record(status="running"), record(status="running"), record(status="succeeded")
    for job in (lost, alive, done):
        store.put(job)
    store.claim_lease(lost.id, "lost-replica", time.time() - 1, now=0)
    store.claim_lease(alive.id, "live-replica", time.time() + 60)
    store.claim_lease(done.id, "done-replica", time.time() - 1, now=0)  # left behind by a finished job
    sent = []
    assert asyncio.run(recover_lost(store, sent.append)) == [lost.id]
    assert [r.id for r in sent] == [lost.id] and store.get(lost.id).status == "queued"
    assert store.get(alive.id).status == "running" and store.get(done.id).status == "succeeded"
    assert set(store.leases()) == {alive.id}


class _Done:
    """What a fake images service answers (fakes only in unit tests)."""

    def model_dump_json(self, **kwargs):
        return '{"created": 1, "data": []}'


class _InstantService:
    async def plan(self, request, image=None, mask=None):
        return request

    async def execute(self, plan, base_url, owner=""):
        return _Done()


def runner_for(tiny_args, store, **webhooks):
    hooks = {**tiny_args["jobs"]["webhooks"], **webhooks}
    config = load_app_config({**tiny_args, "jobs": {**tiny_args["jobs"], "webhooks": hooks}})
    return JobRunner(config, _InstantService(), store, images_store=None)


def test_a_failing_webhook_is_retried_off_the_jobs_slot(tiny_args, store):
    """The job's run returns as soon as the job ends; its webhook, which the receiver refuses
    twice (1 s, then 2 s of backoff), is posted in the background under the job's lease."""
    from tests.unit.test_webhooks import Receiver

    receiver = Receiver(answers=[500, 500])
    runner = runner_for(tiny_args, store, backoff_s=1.0, max_attempts=3)
    job = record(webhook=receiver.url)
    store.put(job)

    async def run_then_wait():
        started = time.monotonic()
        status = await runner.handle_delivery(job.id)
        returned_after = time.monotonic() - started
        mid_delivery = (store.get(job.id).notified, job.id in store.leases())
        await asyncio.gather(*runner.deliveries)
        return status, returned_after, mid_delivery

    status, returned_after, mid_delivery = asyncio.run(run_then_wait())
    receiver.close()
    assert status == "succeeded" and returned_after < 1.0, returned_after
    assert mid_delivery == (False, True)  # the lease is held while the webhook is posted
    assert len(receiver.requests) == 3
    assert store.get(job.id).notified and job.id not in store.leases()


def test_a_webhook_whose_replica_was_lost_is_posted_by_the_sweep(store):
    ended = record(status="succeeded", webhook="https://hooks.example/x")
    handled = record(status="succeeded", webhook="https://hooks.example/y", notified=True)
    for job in (ended, handled):
        store.put(job)
        store.claim_lease(job.id, "lost-replica", time.time() - 1, now=0)
    sent, posted = [], []
    notify = lambda record, lease: posted.append(record)  # noqa: E731
    assert asyncio.run(recover_lost(store, sent.append, notify)) == [ended.id]
    assert sent == [] and [r.id for r in posted] == [ended.id]


def test_a_request_survives_its_trip_through_json():
    request = ImageRequest(task="edit", prompt="p", n=2, seeds=(3, 9), loras=(("ink", 0.5),), size="256x256")
    import dataclasses
    import json

    data = json.loads(json.dumps(dataclasses.asdict(request)))
    data["_base_url"] = "http://x"
    assert request_from(data) == request


def test_the_jobs_config_reads_the_broker_password_from_the_environment(tiny_args, monkeypatch):
    monkeypatch.setenv("SERVE_APP_JOBS_REDIS_PASSWORD", "s3cret")
    config = load_app_config({**tiny_args, "jobs": {"broker_url": "redis://:${SERVE_APP_JOBS_REDIS_PASSWORD}@h:6379/1"}})
    assert config.jobs.broker == config.jobs.state_url == "redis://:s3cret@h:6379/1"
    embedded = load_app_config({**tiny_args, "jobs": {"data_folder": "/d"}}).jobs
    assert (embedded.broker, embedded.state_url) == ("filesystem://", "file:///d/state")


def test_the_embedded_broker_takes_the_priority_queues_in_order(tmp_path):
    """kombu's filesystem transport takes its queues in turns (this test gives
    low, normal, high, low, ... there); ours takes high, then normal, then low."""
    from kombu import Connection, Consumer, Exchange, Queue

    from serve_app.jobs.broker import PRIORITIES, priority_queue

    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path),
               "control_folder": str(tmp_path / "control")}
    queues = {p: Queue(priority_queue("jobs", p), Exchange(priority_queue("jobs", p), "direct"),
                       routing_key=priority_queue("jobs", p)) for p in PRIORITIES}
    sent = ["low", "low", "normal", "low", "high", "normal"]
    taken = []
    transport = "serve_app.jobs.broker:PriorityFilesystemTransport"
    with Connection("filesystem://", transport=transport, transport_options=options) as connection:
        producer = connection.Producer()
        for priority in sent:
            queue = queues[priority]
            producer.publish({"priority": priority}, exchange=queue.exchange,
                             routing_key=queue.routing_key, declare=[queue])
        with Consumer(connection, [queues[p] for p in reversed(PRIORITIES)],
                      callbacks=[lambda body, message: (taken.append(body["priority"]), message.ack())]):
            for _ in sent:
                connection.drain_events(timeout=2)
    assert taken == ["high", "normal", "normal", "low", "low", "low"]


def publish(folder, queue_names):
    """Messages in the embedded broker's queues, as the ingress sends them: Celery tasks through
    the priority transport. (A bare kombu producer after another test's Celery app in the same
    process published nowhere: no control folder and no message file.)"""
    from celery import Celery

    folder.mkdir(parents=True, exist_ok=True)
    app = Celery("sender", broker="filesystem://")
    app.conf.broker_transport = "serve_app.jobs.broker:PriorityFilesystemTransport"
    app.conf.broker_transport_options = {"data_folder_in": str(folder), "data_folder_out": str(folder),
                                         "control_folder": str(folder / "control")}
    try:
        for name in queue_names:
            app.send_task("serve_app.run_job", args=[name], queue=name)
    finally:
        app.close()


def test_the_consumers_scale_on_jobs_queued_and_running(tiny_args, tmp_path):
    """The consumer's autoscaling policy: (queued in every priority + running) jobs over the
    jobs a replica runs at once; the running ones keep their replicas from scaling down."""
    from types import SimpleNamespace

    from ray.serve.config import AutoscalingConfig

    from serve_app.jobs.autoscaling import JobsAutoscalingPolicy, consumer_options, policy_kwargs
    from serve_app.jobs.store import state_backend

    args = {**tiny_args, "jobs": {**tiny_args["jobs"], "data_folder": str(tmp_path), "deployment": {
        "num_cpus": 0.1, "max_ongoing_requests": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}}}
    jobs = load_app_config(args).jobs
    options = consumer_options(jobs)["autoscaling_config"]
    assert options["target_ongoing_requests"] == 2
    assert options["policy"]["policy_kwargs"] == policy_kwargs(jobs, jobs.autoscaling_poll_s)
    policy = JobsAutoscalingPolicy(**policy_kwargs(jobs, poll_interval_s=0.0))
    context = SimpleNamespace(total_num_requests=0, current_num_replicas=1,
                              config=AutoscalingConfig(**{k: v for k, v in options.items() if k != "policy"}))

    async def desired():
        policy(context)  # starts a count
        await policy._task
        return policy(context)

    assert asyncio.run(desired()) == (0, {"jobs": 0})
    publish(tmp_path / "queue", ["images-jobs.high", "images-jobs.low", "images-jobs.low"])
    store = JobStore(state_backend(jobs))
    for job_id in ("job_a", "job_b", "job_c"):
        store.claim_lease(job_id, "replica", time.time() + 20)
    assert asyncio.run(desired()) == (3.0, {"jobs": 6})  # 6 jobs, 2 per replica
    context.current_num_replicas = 0
    assert asyncio.run(desired())[0] == 1  # from zero: one replica to start with
