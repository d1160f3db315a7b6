"""Job records, leases and the recovery of lost jobs (serve_app/jobs), on Celery's file
backend in a temporary folder; the jobs config."""

import asyncio
import time

import pytest

from serve_app.config import load_app_config
from serve_app.jobs.runner import recover_lost, request_from
from serve_app.jobs.store import JobRecord, JobStore, new_job_id, owner_of
from serve_app.service.request import ImageRequest


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
    store.remember("owner-a", "k", "body-1", "job_1")
    assert store.idempotent("owner-a", "k", "body-1") == "job_1"
    assert store.idempotent("owner-a", "k", "body-2") == ""  # same key, other body: a conflict
    assert store.idempotent("owner-b", "k", "body-1") is None  # another key's: unrelated


def test_cancel_flags_and_leases_live_beside_the_record(store):
    store.request_cancel("job_a")
    assert store.cancel_requested("job_a") and not store.cancel_requested("job_b")
    store.renew_lease("job_a", 10.0)
    store.renew_lease("job_b", 20.0)
    assert store.leases() == {"job_a": 10.0, "job_b": 20.0}
    store.drop_lease("job_a")
    assert store.leases() == {"job_b": 20.0}


def test_a_running_job_whose_lease_ran_out_goes_back_to_the_broker(store):
    lost, alive, done = record(status="running"), record(status="running"), record(status="succeeded")
    for job in (lost, alive, done):
        store.put(job)
    store.renew_lease(lost.id, time.time() - 1)
    store.renew_lease(alive.id, time.time() + 60)
    store.renew_lease(done.id, time.time() - 1)  # a lease left behind by a finished job
    sent = []
    assert asyncio.run(recover_lost(store, sent.append)) == [lost.id]
    assert [r.id for r in sent] == [lost.id] and store.get(lost.id).status == "queued"
    assert store.get(alive.id).status == "running" and store.get(done.id).status == "succeeded"
    assert set(store.leases()) == {alive.id}


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
